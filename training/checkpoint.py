"""Atomic, verifiable training checkpoints on top of ``accelerator.save_state``.

Layout: ``<output_dir>/checkpoints/step-00001000/`` holds what ``save_state`` writes (``model.safetensors``,
``optimizer.bin``, random states, ...), ``trainer_state.json`` and, written last, ``COMPLETE``: a JSON manifest of
every file with its size and sha256. A checkpoint is first written under a temporary name, renamed into place,
then marked complete, so a crash at any point leaves either no new checkpoint or an incomplete one that
:func:`latest_checkpoint` ignores: resume never trusts a half-written file.

Resume (:func:`resolve_resume`) also never unpickles anything unsafe. ``accelerator.load_state`` reads
``optimizer.bin`` and ``random_states_*.pkl`` with ``torch.load(weights_only=True)``, but it swallows a refused
random-state file (the run would go on with other random numbers, silently), and it reads registered custom
states with ``weights_only=False``. So before ``load_state`` every file is checked against the manifest (size and
sha256; no file may be missing, added or a symbolic link), and every pickle in the folder is scanned, without
executing it, for globals beyond tensors, containers and the numpy types of the random states
(:func:`check_pickles`). Checkpoints outside the run's ``output_dir`` are refused unless trusted explicitly.
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

from clove_timm.checkpoint_io import UnsafeCheckpointError, pickle_globals_outside

_logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_NAME = re.compile(r"^step-(\d{8,})$")
# Formats that hold no pickle: safetensors (tensors and a JSON header) and JSON.
_NOT_PICKLE_SUFFIXES = (".safetensors", ".json")
# Globals accelerate's random-state files need beyond torch's weights-only allow-list (numpy RNG state arrays);
# the same set that accelerate.utils.other.load allows when it reads them with weights_only=True.
PICKLE_ALLOWED_GLOBALS = frozenset(
    {
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.dtypes.UInt32DType",
        "_codecs.encode",
    }
)


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
    """Check a checkpoint against its manifest: every listed file present with its size (and sha256), and nothing
    else in the folder, no symbolic link.

    Returns:
        Its step.

    Raises:
        ValueError: naming the missing marker, or the missing, changed, unlisted or linked file.
    """
    marker = checkpoint / MARKER
    if not marker.is_file():
        raise ValueError(f"checkpoint {checkpoint} is incomplete: no {MARKER} marker")
    try:
        manifest = json.loads(marker.read_text())
        step, files = int(manifest["step"]), manifest["files"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"checkpoint {checkpoint}: unreadable {MARKER} marker ({e})") from e
    for path in sorted(checkpoint.rglob("*")):
        name = str(path.relative_to(checkpoint))
        if path.is_symlink():
            raise ValueError(f"checkpoint {checkpoint}: {name} is a symbolic link; checkpoints hold plain files only")
        if path.is_file() and name != MARKER and name not in files:
            raise ValueError(f"checkpoint {checkpoint}: {name} is not listed in its {MARKER} manifest")
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


def check_pickles(checkpoint: Path) -> None:
    """Refuse a checkpoint whose pickles reference globals beyond tensors, containers and the numpy RNG types.

    Every file that is not safetensors or JSON is scanned with ``torch.serialization.get_unsafe_globals_in_checkpoint``,
    which reads the pickle's opcodes without executing any. A file that is not a ``torch.save`` zip archive is
    refused too: accelerate writes none.

    Raises:
        UnsafeCheckpointError: naming the file and each offending global.
    """
    for path in sorted(p for p in checkpoint.rglob("*") if p.is_file()):
        if path.name == MARKER or path.name.endswith(_NOT_PICKLE_SUFFIXES):
            continue
        try:
            offending = pickle_globals_outside(path, PICKLE_ALLOWED_GLOBALS)
        except (ValueError, RuntimeError, OSError) as e:
            raise UnsafeCheckpointError(
                f"checkpoint {checkpoint}: {path.name} is not a torch.save archive ({e}); refusing to unpickle it"
            ) from e
        if offending:
            raise UnsafeCheckpointError(
                f"checkpoint {checkpoint}: {path.name} references {', '.join(offending)}, outside the allow-list "
                "(tensors, containers, numpy RNG state types); refusing to resume from it. A genuine checkpoint "
                "never holds these: the file may run code when unpickled."
            )


def complete_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of the checkpoints with a valid marker (sizes checked), oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    for path in root.glob("step-*") if root.is_dir() else ():
        match = _NAME.match(path.name)
        if not match:
            continue
        if path.is_symlink():
            _logger.warning("ignoring checkpoint %s: a symbolic link (to %s)", path, path.resolve())
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
    """The checkpoint a run should resume from, verified against its manifest (pass it to :func:`check_pickles`
    before loading it).

    Args:
        resume: ``"auto"`` (the newest checkpoint in ``output_dir`` that passes full verification, or none),
            ``"none"``, or a folder.
        output_dir: the run's output folder.
        trust: allow a checkpoint outside ``output_dir``. Checkpoints hold pickled optimizer and random states,
            so one from elsewhere is refused unless trusted explicitly.

    Raises:
        ValueError: on an incomplete or corrupted checkpoint given by path, or an untrusted one outside
            ``output_dir``.
    """
    if resume == "none":
        return None
    if resume == "auto":
        chosen = None
        for _, path in reversed(complete_checkpoints(output_dir)):
            try:
                verify(path, check_hashes=True)
            except ValueError as e:  # damaged at rest (a full disk, a bad sector): fall back to the previous one
                _logger.warning("not resuming from %s", e)
                continue
            chosen = path
            break
    else:
        chosen = Path(resume).resolve()
        if not trust and not chosen.is_relative_to(Path(output_dir).resolve()):
            raise ValueError(
                f"refusing to resume from {chosen}: it is outside output_dir {Path(output_dir).resolve()} and "
                "checkpoints contain pickles; pass trust_checkpoint=true if you trust its origin"
            )
        verify(chosen)
    return chosen


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The JSON trainer state of a checkpoint (step, counters, config)."""
    return json.loads((checkpoint / TRAINER_STATE).read_text())
