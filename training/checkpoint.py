"""Atomic, verifiable training checkpoints on top of ``accelerator.save_state``.

Layout: ``<output_dir>/checkpoints/step-00001000/`` holds what ``save_state`` writes (``model.safetensors``,
``optimizer.bin``, random states, ...), ``trainer_state.json`` and, written last, ``COMPLETE``: a JSON manifest of
every file with its size and sha256. A checkpoint is first written under a temporary name, renamed into place,
then marked complete, so a crash at any point leaves either no new checkpoint or an incomplete one that
:func:`latest_checkpoint` ignores: resume never trusts a half-written file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def temporary_dir(output_dir: str | Path, step: int) -> Path:
    return checkpoint_root(output_dir) / f".tmp-{checkpoint_name(step)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON through a temporary file and a rename, so readers see the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def finalize(tmp_dir: Path, output_dir: str | Path, step: int, keep: int) -> Path:
    """Main process only: seal a checkpoint written into ``tmp_dir`` and drop the oldest beyond ``keep``.

    Args:
        tmp_dir: folder that ``save_state`` and the trainer state were written into.
        output_dir: the run's output folder.
        step: optimizer step of the checkpoint.
        keep: complete checkpoints to keep.

    Returns:
        The final checkpoint folder.
    """
    files = {}
    for path in sorted(p for p in tmp_dir.rglob("*") if p.is_file()):
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        files[str(path.relative_to(tmp_dir))] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    final = checkpoint_root(output_dir) / checkpoint_name(step)
    if final.exists():  # an earlier, incomplete attempt at the same step (a complete one is never rewritten)
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    _fsync_dir(final.parent)
    write_json_atomic(final / MARKER, {"step": step, "files": files})
    _fsync_dir(final)
    for old in complete_checkpoints(output_dir)[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def verify(checkpoint: Path, *, check_hashes: bool = True) -> int:
    """Check a checkpoint against its manifest.

    Returns:
        Its step.

    Raises:
        ValueError: naming the missing marker, the missing or changed file.
    """
    marker = checkpoint / MARKER
    if not marker.is_file():
        raise ValueError(f"checkpoint {checkpoint} is incomplete: no {MARKER} marker")
    try:
        manifest = json.loads(marker.read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {checkpoint}: unreadable {MARKER} marker ({e})") from e
    for name, meta in files.items():
        path = checkpoint / name
        if not path.is_file():
            raise ValueError(f"checkpoint {checkpoint}: {name} is missing")
        if path.stat().st_size != meta["size"]:
            raise ValueError(
                f"checkpoint {checkpoint}: {name} has {path.stat().st_size} bytes, expected {meta['size']}"
            )
        if check_hashes and _sha256(path) != meta["sha256"]:
            raise ValueError(f"checkpoint {checkpoint}: {name} does not match its sha256 in {MARKER}")
    return step


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints with a valid marker (sizes checked), oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        match = _NAME.match(path.name)
        if not match:
            continue
        try:
            step = verify(path, check_hashes=False)
        except ValueError as e:
            _logger.warning("ignoring %s", e)
            continue
        if step != int(match.group(1)):
            _logger.warning("ignoring checkpoint %s: its marker says step %d", path, step)
            continue
        found.append((step, path))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = complete_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_resume(resume: str, output_dir: str | Path, *, trust: bool) -> Path | None:
    """The checkpoint a run should resume from.

    Args:
        resume: ``"auto"`` (newest complete checkpoint in ``output_dir``, or none), ``"none"``, or a folder.
        output_dir: the run's output folder.
        trust: allow a checkpoint outside ``output_dir``. Checkpoints hold pickled optimizer and random states,
            so one from elsewhere is refused unless trusted explicitly.

    Raises:
        ValueError: on an incomplete or corrupted checkpoint, or an untrusted one outside ``output_dir``.
    """
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume).resolve()
    if not trust and not path.is_relative_to(Path(output_dir).resolve()):
        raise ValueError(
            f"refusing to resume from {path}: it is outside output_dir {Path(output_dir).resolve()} and checkpoints "
            "contain pickles; pass trust_checkpoint=true if you trust its origin"
        )
    verify(path)
    return path
