"""End-to-end pretraining: a few steps, exact resume, and a 2-process run consistent with one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from training import checkpoint as ckpt
from training.pretrain import main

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "backbone=resnet10t",
    "backbone_kwargs={}",
    "procedural_images=24",
    "procedural_image_size=48",
    "global_size=32",
    "local_size=16",
    "num_local=2",
    "proj_hidden_dim=32",
    "embed_dim=16",
    "num_heads=2",
    "global_batch_size=null",
    "batch_size=4",
    "epochs=2",
    "warmup_epochs=0.5",
    "num_workers=0",
    "log_every=1",
    "monitor_every=2",
    "attention_every=2",
    "trackers=[]",
    "export_name=resnet10t.clove_test",
    "cpu=true",
]


def _run(output_dir, *extra):
    return main(["--recipe", "demo", *TINY, f"output_dir={output_dir}", *extra])


def _final_state(output_dir):
    final = ckpt.latest_checkpoint(output_dir)
    model = load_file(final / "model.safetensors")
    optimizer = torch.load(final / "optimizer.bin", weights_only=True)
    return ckpt.verify(final), model, optimizer


def test_a_few_steps_write_config_checkpoints_and_a_timm_loadable_export(tmp_path):
    result = _run(tmp_path, "max_steps=3", "checkpoint_every=2", "keep_checkpoints=1")
    assert result.step == 3
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "git_revision.txt").read_text().strip()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3]  # keep-last-1 dropped step 2
    model = timm.create_model(f"local-dir:{result.export_dir}", pretrained=True)
    expected = {
        k.removeprefix("student.backbone."): v
        for k, v in result.model.state_dict().items()
        if k.startswith("student.backbone.")
    }
    got = model.state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key
    # the teacher moved towards the student but is not equal to it
    student = dict(result.model.student.named_parameters())
    teacher = dict(result.model.teacher.named_parameters())
    assert any(not torch.equal(student[k], teacher[k]) for k in student)


def test_resume_reproduces_an_uninterrupted_run_bitwise(tmp_path):
    _run(tmp_path / "straight", "max_steps=5", "checkpoint_every=100")
    _run(tmp_path / "resumed", "max_steps=2", "checkpoint_every=100")
    _run(tmp_path / "resumed", "max_steps=5", "checkpoint_every=100", "resume=auto")
    step_a, model_a, opt_a = _final_state(tmp_path / "straight")
    step_b, model_b, opt_b = _final_state(tmp_path / "resumed")
    assert step_a == step_b == 5
    assert model_a.keys() == model_b.keys()
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key  # student, teacher, heads, BN buffers
    for index, state in opt_a["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b["state"][index]["momentum_buffer"]), index


def test_non_finite_loss_stops_before_touching_weights(tmp_path, monkeypatch):
    from training import pretrain

    _run(tmp_path, "max_steps=2", "checkpoint_every=1")
    before = load_file(ckpt.latest_checkpoint(tmp_path) / "model.safetensors")
    original = pretrain.CLoVELoss.forward

    def poisoned(self, *args, **kwargs):
        loss, parts = original(self, *args, **kwargs)  # the loop asks for the loss parts too
        return loss * float("nan"), parts

    monkeypatch.setattr(pretrain.CLoVELoss, "forward", poisoned)
    with pytest.raises(pretrain.NonFiniteLossError, match="non-finite loss at step 2"):
        _run(tmp_path, "max_steps=4", "checkpoint_every=1")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    after = load_file(ckpt.latest_checkpoint(tmp_path) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


# ---- two CPU processes (torchrun) ---------------------------------------------------------------------------------

# 21 samples, 4 per process and micro-batch: 3 optimizer steps per epoch, the last padded with 3 repeats; 2 epochs.
TWO_PROCESS = [*TINY, "procedural_images=21", "max_steps=6", "checkpoint_every=100"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _launch(dump_dir, output_dir, *extra, processes=2, faults=None):
    """Run tests/pretrain_driver.py under torchrun (2 processes) or directly (1 process)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [
        *(launcher if processes == 2 else [sys.executable]),
        str(REPO / "tests" / "pretrain_driver.py"),
        str(dump_dir),
        str(processes),
        *TWO_PROCESS,
        f"output_dir={output_dir}",
        *extra,
    ]
    env = {**ENV, **(faults or {})}
    subprocess.run(command, check=True, env=env, cwd=output_dir.parent, timeout=900)


def _dumped(dump_dir, rank):
    tensors = load_file(dump_dir / f"rank{rank}.safetensors")
    result = json.loads((dump_dir / f"result_rank{rank}.json").read_text())
    keys = [tuple(k) for k in json.loads((dump_dir / f"keys_rank{rank}.json").read_text())]
    return tensors, result, keys


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """An uninterrupted 2-process run of 6 steps: its dump folder and its output folder."""
    root = tmp_path_factory.mktemp("two_processes")
    _launch(root / "dump", root / "run", "grad_accum_steps=1")
    return root / "dump", root / "run"


@pytest.mark.slow
def test_two_cpu_processes_agree_with_each_other_and_with_one_process(two_processes, tmp_path):
    dump2, _ = two_processes
    _launch(tmp_path / "dump1", tmp_path / "one", "grad_accum_steps=2", processes=1)
    (rank0, result0, keys0), (rank1, result1, keys1) = _dumped(dump2, 0), _dumped(dump2, 1)
    single, _, keys_single = _dumped(tmp_path / "dump1", 0)
    assert result0["step"] == result1["step"] == 6
    assert rank0.keys() == rank1.keys() == single.keys()
    assert any(k.startswith("teacher.") for k in rank0) and any(k.startswith("optimizer.") for k in rank0)
    for key in rank0:  # student, teacher and optimizer state: bitwise equal on both ranks
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
        torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=1e-5, msg=f"1 vs 2 processes: {key}")
    # every sample of an epoch once, apart from the padding: the first 24 - 21 = 3 samples of the epoch's order
    per_step = 8  # 2 processes x 4 samples
    assert len(keys0) == len(keys1) == 6 * 4
    union = [k for step in range(6) for k in keys0[step * 4 : (step + 1) * 4] + keys1[step * 4 : (step + 1) * 4]]
    orders = {}
    for epoch in (0, 1):
        order = [index for e, index in union if e == epoch]
        assert len(order) == 3 * per_step
        assert sorted(set(order)) == list(range(21))
        assert order[21:] == order[:3]  # the padding repeats the start of the epoch
        orders[epoch] = order[:21]
    assert orders[0] != orders[1]  # a new order each epoch
    # the same seed gives the same order in another run: one process sees rank 0's then rank 1's part of each step
    assert keys_single == union


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_stops_both_after_the_same_step_and_resume_is_bitwise(two_processes, tmp_path):
    reference_dump, reference_run = two_processes
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    _launch(tmp_path / "stopped", output_dir, faults={"CLOVE_TEST_SIGNAL": "1:2:SIGTERM"})
    results = [_dumped(tmp_path / "stopped", rank)[1] for rank in (0, 1)]
    # the signal reached rank 1 as step 2 began; both finished step 2 and stopped: 3 steps done
    assert results[0] == results[1] == {"step": 3, "preempted": True, "skipped_steps": 0}
    assert [s for s, _ in ckpt.complete_checkpoints(output_dir)] == [3]
    assert not (output_dir / "export").exists()
    _launch(tmp_path / "resumed", output_dir, "resume=auto")
    assert _dumped(tmp_path / "resumed", 0)[1] == {"step": 6, "preempted": False, "skipped_steps": 0}
    for rank in (0, 1):
        expected, resumed = _dumped(reference_dump, rank)[0], _dumped(tmp_path / "resumed", rank)[0]
        for key in expected:  # student, teacher and optimizer state of each rank
            assert torch.equal(expected[key], resumed[key]), f"rank {rank}: {key}"
    _, model_a, opt_a = _final_state(reference_run)
    _, model_b, opt_b = _final_state(output_dir)
    for key in model_a:  # the checkpoint, BatchNorm statistics included
        assert torch.equal(model_a[key], model_b[key]), key
    for index, state in opt_a["state"].items():
        assert torch.equal(state["momentum_buffer"], opt_b["state"][index]["momentum_buffer"]), index


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_nan_on_one_of_two_processes_stops_or_skips_on_both(tmp_path, policy):
    output_dir = tmp_path / "run"
    output_dir.mkdir()
    _launch(tmp_path / "dump", output_dir, f"nonfinite_loss={policy}", faults={"CLOVE_TEST_NAN": "1:2"})
    results = [_dumped(tmp_path / "dump", rank)[1] if policy == "skip" else None for rank in (0, 1)]
    if policy == "stop":
        for rank in (0, 1):
            result = json.loads((tmp_path / "dump" / f"result_rank{rank}.json").read_text())
            assert result["error"] == "NonFiniteLossError" and result["step"] == 2
            assert "non-finite loss at step 2 on 1 process(es)" in result["message"]
        return
    assert results[0] == results[1] == {"step": 6, "preempted": False, "skipped_steps": 1}
    rank0, rank1 = _dumped(tmp_path / "dump", 0)[0], _dumped(tmp_path / "dump", 1)[0]
    for key in rank0:
        assert torch.isfinite(rank0[key]).all(), key
        assert torch.equal(rank0[key], rank1[key]), key
    for rank in (0, 1):
        for key, value in load_file(tmp_path / "dump" / f"buffers_rank{rank}.safetensors").items():
            assert torch.isfinite(value.float()).all(), f"rank {rank}: {key}"


def test_logged_metrics_include_loss_parts_and_collapse_monitor(tmp_path, monkeypatch):
    from accelerate import Accelerator

    logged: list[dict] = []
    monkeypatch.setattr(Accelerator, "log", lambda self, values, step=None, log_kwargs=None: logged.append(values))
    _run(tmp_path, "max_steps=2", "checkpoint_every=100")
    keys = set().union(*logged)
    expected = {"loss", "lr", "teacher_momentum", "samples_per_s", "loss_parts/global", "loss_parts/local"}
    assert expected | {"loss_parts/pos_similarity", "loss_parts/neg_similarity"} <= keys
    assert {"collapse/feature_std", "collapse/effective_rank"} <= keys
    first = next(v for v in logged if "loss" in v)
    assert -1.0 <= first["loss_parts/pos_similarity"] <= 1.0
