"""Atomic checkpoints: what resume trusts after a crash at any point of a save."""

from __future__ import annotations

import json

import pytest

from training import checkpoint as ckpt


def _write_tmp(output_dir, step, files=None):
    tmp = ckpt.temporary_dir(output_dir, step)
    tmp.mkdir(parents=True)
    for name, data in (files or {"model.safetensors": b"m" * 100, "optimizer.bin": b"o" * 50}).items():
        (tmp / name).write_bytes(data)
    return tmp


def _save(output_dir, step, keep=5):
    return ckpt.finalize(_write_tmp(output_dir, step), output_dir, step, keep)


def test_finalize_seals_and_latest_picks_the_highest_step(tmp_path):
    for step in (10, 30, 20):
        _save(tmp_path, step)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [10, 20, 30]
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000030"
    manifest = json.loads((ckpt.latest_checkpoint(tmp_path) / ckpt.MARKER).read_text())
    assert manifest["step"] == 30 and set(manifest["files"]) == {"model.safetensors", "optimizer.bin"}
    assert not list(ckpt.checkpoint_root(tmp_path).glob(".tmp-*"))


def test_keep_last_k(tmp_path):
    for step in range(1, 6):
        _save(tmp_path, step, keep=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [4, 5]


@pytest.mark.parametrize("crash_point", ["before_rename", "after_rename_before_marker", "half_written_marker"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint_as_latest(tmp_path, crash_point):
    _save(tmp_path, 100)
    tmp = _write_tmp(tmp_path, 200)
    if crash_point != "before_rename":
        final = ckpt.checkpoint_root(tmp_path) / ckpt.checkpoint_name(200)
        tmp.rename(final)
        if crash_point == "half_written_marker":
            (final / ckpt.MARKER).write_text('{"step": 200, "fil')
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000100"
    assert ckpt.resolve_resume("auto", tmp_path, trust=False).name == "step-00000100"


def test_truncated_or_changed_file_is_detected(tmp_path):
    final = _save(tmp_path, 7)
    (final / "optimizer.bin").write_bytes(b"o" * 49)
    assert ckpt.latest_checkpoint(tmp_path) is None  # size check on discovery
    with pytest.raises(ValueError, match=r"optimizer\.bin has 49 bytes"):
        ckpt.verify(final)
    (final / "optimizer.bin").write_bytes(b"x" * 50)  # same size, other content: the hash catches it
    with pytest.raises(ValueError, match=r"optimizer\.bin does not match its sha256"):
        ckpt.verify(final)


def test_a_retry_at_the_same_step_replaces_an_incomplete_folder(tmp_path):
    tmp = _write_tmp(tmp_path, 5)
    tmp.rename(ckpt.checkpoint_root(tmp_path) / ckpt.checkpoint_name(5))  # crashed before its marker
    _save(tmp_path, 5)
    assert ckpt.verify(ckpt.latest_checkpoint(tmp_path)) == 5


def test_resume_modes(tmp_path):
    assert ckpt.resolve_resume("auto", tmp_path, trust=False) is None
    assert ckpt.resolve_resume("none", tmp_path, trust=False) is None
    final = _save(tmp_path, 3)
    assert ckpt.resolve_resume(str(final), tmp_path, trust=False) == final.resolve()
    other_run = tmp_path / "other"
    with pytest.raises(ValueError, match="outside output_dir"):
        ckpt.resolve_resume(str(final), other_run, trust=False)
    assert ckpt.resolve_resume(str(final), other_run, trust=True) == final.resolve()
    (final / ckpt.MARKER).unlink()
    with pytest.raises(ValueError, match="incomplete"):
        ckpt.resolve_resume(str(final), tmp_path, trust=False)
