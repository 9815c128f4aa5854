"""Runs training.pretrain.main in a launched process and dumps this rank's trained state (used by the tests).

ACCELERATE_USE_CPU=1 torchrun --standalone --nproc_per_node 2 tests/pretrain_driver.py DUMP_DIR EXPECTED_N [overrides]
"""

from __future__ import annotations

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from training.pretrain import main


def run() -> None:
    dump_dir, expected, overrides = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    state = PartialState(cpu=True)
    assert state.num_processes == expected, f"launched {state.num_processes} processes, expected {expected}"
    result = main(["--recipe", "demo", *overrides])
    assert result.num_processes == expected
    tensors = {k: v.detach().contiguous() for k, v in result.model.named_parameters()}
    for i, group_state in enumerate(result.optimizer.state.values()):
        tensors[f"optimizer.{i}.momentum_buffer"] = group_state["momentum_buffer"].contiguous()
    dump_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, dump_dir / f"rank{state.process_index}.safetensors")


if __name__ == "__main__":
    run()
