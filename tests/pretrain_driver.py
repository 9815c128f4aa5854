"""Runs training.pretrain.main in a launched process and dumps this rank's trained state (used by the tests).

ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/pretrain_driver.py DUMP_DIR EXPECTED_N [overrides]

Writes into DUMP_DIR, per rank r: ``rank{r}.safetensors`` (parameters, student and teacher, and the optimizer's
momentum buffers), ``buffers_rank{r}.safetensors`` (BatchNorm statistics), ``keys_rank{r}.json`` (the
``(epoch, index)`` keys this rank's data set served, in order) and ``result_rank{r}.json`` (final step, whether
preempted, skipped steps, or the error that stopped the run).

Faults for the tests, injected into one rank at the start of one optimizer step (environment variables):
``CLOVE_TEST_SIGNAL=RANK:STEP:SIGNAL`` sends the signal to that rank's own process (a real signal, handled like
one from a scheduler); ``CLOVE_TEST_NAN=RANK:STEP`` makes that rank's loss NaN in that step.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from training import pretrain
from training.data import MultiCropDataset


def _fault(name: str, rank: int) -> list[str] | None:
    value = os.environ.get(name)
    if not value:
        return None
    target, *rest = value.split(":")
    return rest if int(target) == rank else None


def _install_faults(rank: int, keys: list[list[int]]) -> None:
    current = {"step": -1}
    original_lr, original_loss = pretrain.learning_rate, pretrain.CLoVELoss.forward
    original_getitem = MultiCropDataset.__getitem__
    send = _fault("CLOVE_TEST_SIGNAL", rank)
    nan = _fault("CLOVE_TEST_NAN", rank)

    def learning_rate(step, **kwargs):
        current["step"] = step
        if send is not None and step == int(send[0]):
            os.kill(os.getpid(), signal.Signals[send[1]])
        return original_lr(step, **kwargs)

    def loss_forward(criterion, *args, **kwargs):
        loss, parts = original_loss(criterion, *args, **kwargs)  # the loop asks for the loss parts too
        return (loss * float("nan") if nan is not None and current["step"] == int(nan[0]) else loss), parts

    def getitem(dataset, key):
        keys.append(list(key))
        return original_getitem(dataset, key)

    pretrain.learning_rate = learning_rate
    pretrain.CLoVELoss.forward = loss_forward
    MultiCropDataset.__getitem__ = getitem  # DataLoader workers: 0 in the tests, so this runs in this process


def run() -> None:
    dump_dir, expected, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    state = PartialState(cpu=True)
    assert state.num_processes == expected, f"launched {state.num_processes} processes, expected {expected}"
    rank = state.process_index
    keys: list[list[int]] = []
    _install_faults(rank, keys)
    dump_dir.mkdir(parents=True, exist_ok=True)
    try:
        result = pretrain.main(["--recipe", "demo", *overrides])
    except pretrain.NonFiniteLossError as error:
        summary = {"error": "NonFiniteLossError", "step": error.step, "message": str(error)}
        result = None
    else:
        summary = {"step": result.step, "preempted": result.preempted, "skipped_steps": result.skipped_steps}
    (dump_dir / f"result_rank{rank}.json").write_text(json.dumps(summary))
    (dump_dir / f"keys_rank{rank}.json").write_text(json.dumps(keys))
    if result is None:
        return
    assert result.num_processes == expected
    tensors = {k: v.detach().contiguous() for k, v in result.model.named_parameters()}
    for i, group_state in enumerate(result.optimizer.state.values()):
        tensors[f"optimizer.{i}.momentum_buffer"] = group_state["momentum_buffer"].contiguous()
    save_file(tensors, dump_dir / f"rank{rank}.safetensors")
    # BatchNorm statistics apart: each process updates them from its own micro-batch (DDP broadcasts rank 0's)
    buffers = {k: v.detach().contiguous() for k, v in result.model.named_buffers()}
    save_file(buffers, dump_dir / f"buffers_rank{rank}.safetensors")


if __name__ == "__main__":
    run()
