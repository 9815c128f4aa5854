"""Preemption: a signal makes the run finish its step, write a checkpoint and stop; a relaunch continues.

The in-process tests deliver real signals to the test process itself at a chosen point of the loop; the slow test
runs the command line in a subprocess and sends SIGTERM from outside at whatever moment it lands, three times in a
row, with ``keep_checkpoints=2``. The two-process case (SIGTERM to one rank) is in ``tests/test_pretrain.py``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from tests.test_pretrain import TINY
from training import checkpoint as ckpt
from training import pretrain
from training.data import worker_init

REPO = Path(__file__).resolve().parents[1]


def _run(output_dir, *extra):
    return pretrain.main(["--recipe", "demo", *TINY, f"output_dir={output_dir}", *extra])


def _signal_when(monkeypatch, signum, *, step=None, in_build=False):
    """Send ``signum`` to this process as optimizer step ``step`` begins, or while the model is being built."""
    original_lr, original_build = pretrain.learning_rate, pretrain.build_model

    def learning_rate(current, **kwargs):
        if current == step:
            os.kill(os.getpid(), signum)
        return original_lr(current, **kwargs)

    def build_model(config):
        if in_build:
            os.kill(os.getpid(), signum)
        return original_build(config)

    monkeypatch.setattr(pretrain, "learning_rate", learning_rate)
    monkeypatch.setattr(pretrain, "build_model", build_model)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_preemption_signal_finishes_the_step_checkpoints_and_a_relaunch_finishes(tmp_path, monkeypatch, signum):
    handler_before = signal.getsignal(signum)
    _signal_when(monkeypatch, signum, step=1)
    stopped = _run(tmp_path, "max_steps=4", "checkpoint_every=100")
    assert stopped.preempted and stopped.step == 2  # step 1 was finished, then the run stopped
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2]
    assert not (tmp_path / "export").exists()  # exported only when the run is done
    assert signal.getsignal(signum) == handler_before  # the handler is the run's only while it runs
    monkeypatch.undo()
    finished = _run(tmp_path, "max_steps=4", "checkpoint_every=100", "resume=auto")
    assert not finished.preempted and finished.step == 4
    assert (tmp_path / "export" / "model.safetensors").is_file()


def test_a_signal_during_start_up_ends_with_a_checkpoint_after_one_step(tmp_path, monkeypatch):
    _signal_when(monkeypatch, signal.SIGTERM, in_build=True)
    result = _run(tmp_path, "max_steps=4", "checkpoint_every=100")
    assert result.preempted and result.step == 1
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1]


def test_a_signal_at_a_checkpoint_step_writes_that_checkpoint_once(tmp_path, monkeypatch):
    _signal_when(monkeypatch, signal.SIGTERM, step=1)
    saved = []
    original = pretrain.save_checkpoint

    def save_checkpoint(accelerator, config, step, *args):
        saved.append(step)
        return original(accelerator, config, step, *args)

    monkeypatch.setattr(pretrain, "save_checkpoint", save_checkpoint)
    result = _run(tmp_path, "max_steps=4", "checkpoint_every=2")
    assert result.preempted and result.step == 2
    assert saved == [2]  # rewriting a complete checkpoint would open a window with none


class _WorkerPids(torch.utils.data.Dataset):
    """Each item is the pid of the DataLoader worker that produced it."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        time.sleep(0.005)
        return os.getpid()


@pytest.mark.parametrize("ignore", [True, False], ids=["workers_ignore", "default_action"])
def test_data_workers_survive_a_signal_meant_for_the_whole_job(ignore):
    init = worker_init(["SIGTERM", "SIGUSR1"]) if ignore else None
    loader = DataLoader(_WorkerPids(), batch_size=2, num_workers=2, worker_init_fn=init)
    batches = iter(loader)
    pids = {pid for _ in range(4) for pid in next(batches).tolist()}
    assert len(pids) == 2 and os.getpid() not in pids
    for pid in pids:  # what a scheduler does to every process of a preempted job
        os.kill(pid, signal.SIGTERM)
    if ignore:
        assert len(list(batches)) == 32 - 4
    else:  # without the worker_init_fn the data pipeline dies with the workers
        with pytest.raises(RuntimeError, match=r"DataLoader worker .*(killed by signal|exited unexpectedly)"):
            list(batches)


def test_unknown_signal_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"preemption_signals: unknown signal names \['SIGNOPE'\]"):
        _run(tmp_path, "preemption_signals=[SIGTERM, SIGNOPE]")


def _command_line(output_dir, *extra):
    return [
        sys.executable,
        "-m",
        "training.pretrain",
        "--recipe",
        "demo",
        *TINY,
        f"output_dir={output_dir}",
        "checkpoint_every=1",
        "keep_checkpoints=2",
        *extra,
    ]


def _latest_step(output_dir):
    latest = ckpt.latest_checkpoint(output_dir)
    return -1 if latest is None else int(latest.name.split("-")[1])


@pytest.mark.slow
def test_three_requeues_in_a_row_with_keep_last_2_never_go_back_and_finish_bitwise(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    straight = subprocess.run(_command_line(tmp_path / "straight"), env=env, cwd=tmp_path, timeout=900)
    assert straight.returncode == 0
    output_dir = tmp_path / "requeued"
    history = []
    for _ in range(3):
        start = _latest_step(output_dir)
        process = subprocess.Popen(
            _command_line(output_dir, "resume=auto"), env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 600
        while _latest_step(output_dir) <= start and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)  # lands wherever the run is: mid-step, mid-save, in the data loader
        out, _ = process.communicate(timeout=600)
        assert process.returncode == pretrain.PREEMPTED_EXIT_CODE, out
        assert "relaunch with resume=auto" in out
        steps = [s for s, _ in ckpt.complete_checkpoints(output_dir)]
        assert len(steps) <= 2 and steps[-1] > start  # never back, always forward
        history.append(steps[-1])
    assert history == sorted(set(history)) and history[-1] < 12
    finished = subprocess.run(_command_line(output_dir, "resume=auto"), env=env, cwd=tmp_path, timeout=900)
    assert finished.returncode == 0
    a, b = ckpt.latest_checkpoint(tmp_path / "straight"), ckpt.latest_checkpoint(output_dir)
    assert ckpt.verify(a) == ckpt.verify(b) == 12
    model_a, model_b = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    for key in model_a:
        assert torch.equal(model_a[key], model_b[key]), key
    opt_a = torch.load(a / "optimizer.bin", weights_only=True)["state"]
    opt_b = torch.load(b / "optimizer.bin", weights_only=True)["state"]
    for index, state in opt_a.items():
        assert torch.equal(state["momentum_buffer"], opt_b[index]["momentum_buffer"]), index
