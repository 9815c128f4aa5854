"""End-to-end pretraining: a few steps, exact resume, and a 2-process run consistent with one process."""

from __future__ import annotations

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
        return original(self, *args, **kwargs) * float("nan")

    monkeypatch.setattr(pretrain.CLoVELoss, "forward", poisoned)
    with pytest.raises(pretrain.NonFiniteLossError, match="non-finite loss at step 2"):
        _run(tmp_path, "max_steps=4", "checkpoint_every=1")
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000002"
    after = load_file(ckpt.latest_checkpoint(tmp_path) / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_two_cpu_processes_agree_with_each_other_and_with_one_process(tmp_path):
    common = [*TINY, "max_steps=3", "checkpoint_every=100"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    two = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(REPO / "tests" / "pretrain_driver.py"),
        str(tmp_path / "dump2"),
        "2",
        *common,
        f"output_dir={tmp_path / 'two'}",
        "grad_accum_steps=1",
    ]
    subprocess.run(two, check=True, env=env, cwd=tmp_path, timeout=900)
    one = [
        sys.executable,
        str(REPO / "tests" / "pretrain_driver.py"),
        str(tmp_path / "dump1"),
        "1",
        *common,
        f"output_dir={tmp_path / 'one'}",
        "grad_accum_steps=2",
    ]
    subprocess.run(one, check=True, env=env, cwd=tmp_path, timeout=900)
    rank0 = load_file(tmp_path / "dump2" / "rank0.safetensors")
    rank1 = load_file(tmp_path / "dump2" / "rank1.safetensors")
    single = load_file(tmp_path / "dump1" / "rank0.safetensors")
    assert rank0.keys() == rank1.keys() == single.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ on {key}"
        torch.testing.assert_close(rank0[key], single[key], atol=1e-6, rtol=1e-5, msg=f"1 vs 2 processes: {key}")
