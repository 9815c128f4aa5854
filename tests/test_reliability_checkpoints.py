"""Checkpoints under crashes and from strangers: what resume picks, what it refuses, and the export's integrity.

One real run (2 steps, a checkpoint after each, then the export) provides the files; each test copies them and
breaks the copy: a crash after each file of a save, a truncated or changed file, malicious pickles planted in the
checkpoint, a one-byte flip or a truncation of the exported weights.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import re
import shutil

import pytest
import timm
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from clove_timm.checkpoint_io import (
    CheckpointFormatError,
    ChecksumError,
    UnsafeCheckpointError,
    load_source_checkpoint,
    verify_sha256sums,
)
from tests.test_pretrain import TINY
from training import checkpoint as ckpt
from training.pretrain import main

# The files of a checkpoint in the order they are written: accelerate's save_state (model, optimizer, random
# states), then the trainer state; finalize then renames the folder and writes the COMPLETE marker last.
WRITE_ORDER = ("model.safetensors", "optimizer.bin", "random_states_0.pkl", "trainer_state.json")


def _run(output_dir, *extra):
    return main(["--recipe", "demo", *TINY, f"output_dir={output_dir}", *extra])


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run with complete checkpoints at steps 1 and 2 and its export."""
    output_dir = tmp_path_factory.mktemp("finished_run")
    _run(output_dir, "max_steps=2", "checkpoint_every=1")
    return output_dir


@pytest.fixture
def run_copy(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


def _step_dir(output_dir, step):
    return ckpt.checkpoint_root(output_dir) / ckpt.checkpoint_name(step)


def _picked(output_dir):
    chosen = ckpt.resolve_resume("auto", output_dir, trust=False)
    return None if chosen is None else ckpt.verify(chosen)


def test_the_checkpoint_holds_exactly_the_files_in_write_order(finished_run):
    manifest = json.loads((_step_dir(finished_run, 2) / ckpt.MARKER).read_text())
    assert sorted(manifest["files"]) == sorted(WRITE_ORDER)
    assert [s for s, _ in ckpt.complete_checkpoints(finished_run)] == [1, 2]


def _crash_states():
    """Names of the on-disk states a crash while saving step 2 can leave."""
    states = [f"after_{k}_files" for k in range(len(WRITE_ORDER) + 1)]
    states += [f"while_writing_{name}" for name in WRITE_ORDER]
    return [*states, "renamed_before_marker", "half_written_marker", "file_truncated_later", "byte_flipped_later"]


def _leave_crash_state(output_dir, state):
    """Turn the complete step-2 checkpoint into what the crash ``state`` leaves on disk."""
    final = _step_dir(output_dir, 2)
    if state.startswith(("after_", "while_writing_")):
        tmp = ckpt.temporary_dir(output_dir, 2)
        tmp.mkdir()
        if state.startswith("after_"):
            written, partial = int(state.split("_")[1]), None
        else:
            partial = state.removeprefix("while_writing_")
            written = WRITE_ORDER.index(partial)
        for name in WRITE_ORDER[:written]:
            shutil.copy2(final / name, tmp / name)
        if partial is not None:  # the file being written when the process died: half of it reached the disk
            data = (final / partial).read_bytes()
            (tmp / partial).write_bytes(data[: len(data) // 2])
        shutil.rmtree(final)
    elif state == "renamed_before_marker":
        (final / ckpt.MARKER).unlink()
    elif state == "half_written_marker":
        marker = (final / ckpt.MARKER).read_text()
        (final / ckpt.MARKER).write_text(marker[: len(marker) // 2])
    elif state == "file_truncated_later":
        data = (final / "optimizer.bin").read_bytes()
        (final / "optimizer.bin").write_bytes(data[:-100])
    elif state == "byte_flipped_later":  # same size: only the sha256 tells
        data = bytearray((final / "model.safetensors").read_bytes())
        data[len(data) // 2] ^= 0x01
        (final / "model.safetensors").write_bytes(bytes(data))


@pytest.mark.parametrize("state", _crash_states())
def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_the_one_resume_picks(run_copy, state):
    assert _picked(run_copy) == 2
    _leave_crash_state(run_copy, state)
    assert _picked(run_copy) == 1


def test_resuming_after_a_crash_reproduces_the_lost_checkpoint_bitwise(finished_run, run_copy):
    _leave_crash_state(run_copy, "byte_flipped_later")
    result = _run(run_copy, "max_steps=2", "checkpoint_every=1", "resume=auto")
    assert result.step == 2
    original = load_file(_step_dir(finished_run, 2) / "model.safetensors")
    redone = load_file(_step_dir(run_copy, 2) / "model.safetensors")
    assert original.keys() == redone.keys()
    for key in original:
        assert torch.equal(original[key], redone[key]), key
    momentum = torch.load(_step_dir(finished_run, 2) / "optimizer.bin", weights_only=True)["state"]
    redone_momentum = torch.load(_step_dir(run_copy, 2) / "optimizer.bin", weights_only=True)["state"]
    for index, state in momentum.items():
        assert torch.equal(state["momentum_buffer"], redone_momentum[index]["momentum_buffer"]), index


# ---- untrusted files -------------------------------------------------------------------------------------------


class _RunsCode:
    """Unpickles by calling ``func(*args)``: what a malicious pickle does."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


class UnknownState:
    """A class no checkpoint of this project stores; unpickling it would import this test module."""

    def __init__(self, marker):
        self.marker = marker


def _payloads(marker):
    """Objects that print PWNED and create ``marker`` when unpickled unsafely, and the global to be named."""
    touch = f"print('PWNED'); open({str(marker)!r}, 'w').close()"
    return {
        "os_system": (_RunsCode(os.system, f"echo PWNED; touch {marker}"), f"{os.system.__module__}.system"),
        "exec": (_RunsCode(exec, touch), "builtins.exec"),
        "partial_chain": (_RunsCode(functools.partial(functools.partial(exec, touch))), "functools.partial"),
        "unknown_class": (UnknownState(str(marker)), f"{__name__}.UnknownState"),
    }


def _reseal(checkpoint):
    """Rewrite the manifest to match the planted files, as an attacker with write access would."""
    tmp = checkpoint.parent / f".tmp-{checkpoint.name}"
    (checkpoint / ckpt.MARKER).unlink()
    checkpoint.rename(tmp)
    ckpt.finalize(tmp, checkpoint.parent.parent, int(checkpoint.name.split("-")[1]), keep=10)


def test_the_payloads_are_live(tmp_path, capfd):
    """Unpickled without restriction the payloads run code (which is why every loader must refuse them)."""
    marker = tmp_path / "executed"
    for evil, _ in _payloads(marker).values():
        if isinstance(evil, _RunsCode):
            pickle.loads(pickle.dumps(evil))
            assert marker.exists()
            marker.unlink()
    assert "PWNED" in capfd.readouterr().out


@pytest.mark.parametrize("payload", ["os_system", "exec", "partial_chain", "unknown_class"])
@pytest.mark.parametrize("planted_in", ["random_states_0.pkl", "optimizer.bin"])
def test_resume_refuses_a_malicious_pickle_naming_the_global_without_running_it(run_copy, payload, planted_in, capfd):
    marker = run_copy.parent / "executed"
    evil, offending = _payloads(marker)[payload]
    checkpoint = _step_dir(run_copy, 2)
    original = torch.load(checkpoint / planted_in, weights_only=False)  # the genuine file, written by this run
    original["payload" if isinstance(original, dict) else 0] = evil
    torch.save(original, checkpoint / planted_in)
    _reseal(checkpoint)  # sizes and sha256 match: only the pickle scan can tell
    capfd.readouterr()
    with pytest.raises(UnsafeCheckpointError, match=re.escape(planted_in) + ".*references .*" + re.escape(offending)):
        _run(run_copy, "max_steps=3", "resume=auto")
    assert not marker.exists()
    assert "PWNED" not in "".join(capfd.readouterr())
    assert _picked(run_copy) == 2  # nothing was written over it


def test_resume_refuses_pickles_that_are_not_torch_archives(run_copy):
    marker = run_copy.parent / "executed"
    checkpoint = _step_dir(run_copy, 2)
    (checkpoint / "random_states_0.pkl").write_bytes(pickle.dumps(_payloads(marker)["os_system"][0]))
    _reseal(checkpoint)
    with pytest.raises(UnsafeCheckpointError, match=r"random_states_0\.pkl is not a torch\.save archive"):
        ckpt.check_pickles(checkpoint)
    assert not marker.exists()


def test_a_planted_file_or_link_makes_the_checkpoint_untrusted(run_copy, tmp_path):
    checkpoint = _step_dir(run_copy, 2)
    evil = tmp_path / "evil.pkl"
    torch.save({"payload": _payloads(tmp_path / "executed")["os_system"][0]}, evil)
    # accelerate would unpickle custom_checkpoint_0.pkl with weights_only=False for a registered object
    shutil.copy(evil, checkpoint / "custom_checkpoint_0.pkl")
    with pytest.raises(ValueError, match=r"custom_checkpoint_0\.pkl is not listed in its COMPLETE manifest"):
        ckpt.verify(checkpoint)
    assert _picked(run_copy) == 1  # auto falls back to the newest checkpoint that verifies
    (checkpoint / "custom_checkpoint_0.pkl").unlink()
    (checkpoint / "random_states_0.pkl").unlink()
    (checkpoint / "random_states_0.pkl").symlink_to(evil)
    with pytest.raises(ValueError, match=r"random_states_0\.pkl is a symbolic link"):
        ckpt.resolve_resume(str(checkpoint), run_copy, trust=False)
    linked_run = tmp_path / "linked_run"
    ckpt.checkpoint_root(linked_run).mkdir(parents=True)
    _step_dir(linked_run, 5).symlink_to(_step_dir(run_copy, 1))  # a step folder pointing elsewhere
    assert ckpt.latest_checkpoint(linked_run) is None


def test_a_checkpoint_outside_output_dir_needs_trust(finished_run, tmp_path):
    elsewhere = _step_dir(finished_run, 1)
    with pytest.raises(ValueError, match=r"outside output_dir .* trust_checkpoint=true"):
        _run(tmp_path / "new_run", "max_steps=2", f"resume={elsewhere}")
    result = _run(tmp_path / "new_run", "max_steps=2", f"resume={elsewhere}", "trust_checkpoint=true")
    assert result.step == 2
    redone = load_file(_step_dir(tmp_path / "new_run", 2) / "model.safetensors")
    original = load_file(_step_dir(finished_run, 2) / "model.safetensors")
    assert all(torch.equal(original[k], redone[k]) for k in original)


def test_a_one_byte_flip_in_the_export_fails_verification(run_copy):
    export = run_copy / "export"
    assert set(verify_sha256sums(export)) >= {"model.safetensors", "config.json"}
    weights = export / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last byte of the last tensor: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match=r"model\.safetensors: sha256 differs from SHA256SUMS"):
        verify_sha256sums(export)


def test_a_truncated_export_fails_to_load(run_copy):
    export = run_copy / "export"
    weights = export / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ChecksumError, match=r"model\.safetensors: sha256 differs"):
        verify_sha256sums(export)
    with pytest.raises(CheckpointFormatError, match="not a readable safetensors file"):
        load_source_checkpoint(weights)
    with pytest.raises(SafetensorError):
        timm.create_model(f"local-dir:{export}", pretrained=True)
