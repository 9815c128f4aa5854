"""Reading pretraining checkpoints for export, including ones downloaded from strangers.

Three sources are accepted (:func:`load_source_checkpoint`):

- a checkpoint directory written by the pretraining loop (accelerate ``save_state``); only its
  ``model.safetensors`` is read, never the pickled optimizer or RNG files beside it;
- a ``.safetensors`` file, either a :class:`~clove_timm.model.CLoVEModel` state dict (``student.backbone.*``,
  ``teacher.backbone.*``, heads) or a bare backbone (an earlier export);
- a checkpoint file of the reference code (``ckpt_epoch_*.pth``; method doc section 5):
  ``torch.save({'opt': argparse.Namespace, 'model': DDP state dict, 'optimizer', 'scaler', 'epoch'})``.

Reference checkpoints are pickles, and unpickling can run arbitrary code. :func:`load_reference_checkpoint`
first lists the globals the pickle references without executing it and refuses any beyond torch's tensor
rebuilding allow-list and ``argparse.Namespace`` (the only class the reference stores), then loads with
``torch.load(weights_only=True)`` under that same allow-list. There is no fallback to unrestricted loading.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import torch

__all__ = [
    "REFERENCE_ALLOWED_GLOBALS",
    "SHA256SUMS_NAME",
    "CheckpointFormatError",
    "ChecksumError",
    "Layout",
    "SourceCheckpoint",
    "UnsafeCheckpointError",
    "detect_layout",
    "load_reference_checkpoint",
    "load_source_checkpoint",
    "pickle_globals_outside",
    "read_safetensors_metadata",
    "sha256_file",
    "verify_sha256sums",
    "write_sha256sums",
]

_logger = logging.getLogger(__name__)

Layout = Literal["clove_timm", "reference", "backbone"]

REFERENCE_ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)
"""Classes a reference checkpoint may contain besides tensors and containers: the pickled ``opt`` Namespace."""

SAFETENSORS_NAME = "model.safetensors"
_REFERENCE_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")

# Key prefixes that identify a layout: a CLoVEModel state dict, and the reference model (DDP-wrapped or not).
_CLOVE_PREFIXES = ("student.backbone.", "teacher.backbone.")
_REFERENCE_PREFIXES = ("module.encoder.", "module.encoder_k.", "encoder.", "encoder_k.")


class UnsafeCheckpointError(ValueError):
    """A pickled checkpoint references globals outside the allow-list; it was not unpickled."""


class CheckpointFormatError(ValueError):
    """A checkpoint does not have the expected structure (missing keys, wrong types, unknown layout)."""


@dataclass(frozen=True)
class SourceCheckpoint:
    """A checkpoint read for export.

    Attributes:
        path: the file that was read (``<dir>/model.safetensors`` for a checkpoint directory).
        sha256: hex SHA-256 of that file.
        layout: ``"clove_timm"`` (CLoVEModel keys), ``"reference"`` (reference ``module.encoder*`` keys) or
            ``"backbone"`` (bare timm backbone keys).
        state_dict: all tensors of the model, keys as stored.
        metadata: what the file says about itself: safetensors metadata, or for a reference checkpoint its
            ``epoch`` and selected ``opt`` fields, as strings.
    """

    path: Path
    sha256: str
    layout: Layout
    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)


def sha256_file(path: str | Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The ``__metadata__`` block of a safetensors file (empty if absent), without loading tensors."""
    with safetensors.safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def _global_name(qualified: type) -> str:
    return f"{qualified.__module__}.{qualified.__qualname__}"


def _globals_named_in_error(error: Exception) -> list[str]:
    # torch's message reads "... unsupported GLOBAL posix.system ..." / "Unsupported global: GLOBAL x.y ...", and
    # names builtins without their module ("GLOBAL exec"; protocol-2 pickles say "__builtin__").
    names = set()
    for name in re.findall(r"GLOBAL ([\w.]+)", str(error)):
        module, _, attribute = name.rpartition(".")
        names.add(f"{'builtins' if module in ('', '__builtin__') else module}.{attribute}")
    return sorted(names)


def pickle_globals_outside(path: str | Path, allowed: Collection[str]) -> list[str]:
    """Globals a ``torch.save`` archive references beyond torch's weights-only allow-list and ``allowed``.

    Reads the pickle's opcodes without executing them (``torch.serialization.get_unsafe_globals_in_checkpoint``).

    Args:
        path: a ``torch.save`` zip archive.
        allowed: extra ``module.qualname`` names to accept, e.g. ``"argparse.Namespace"``.

    Returns:
        The offending globals, sorted; empty if the file only needs the allow-lists.

    Raises:
        ValueError: ``path`` is not a ``torch.save`` zip archive (e.g. the legacy pre-1.6 format).
    """
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path))) - set(allowed))


def load_reference_checkpoint(path: str | Path) -> dict[str, Any]:
    """Unpickle a reference checkpoint with nothing but tensors, containers and ``argparse.Namespace`` allowed.

    Args:
        path: a ``torch.save`` file of the reference code.

    Returns:
        The unpickled top-level object (a dict for a genuine reference checkpoint).

    Raises:
        UnsafeCheckpointError: the pickle references another global (the message names each one); nothing of
            the file was executed.
        CheckpointFormatError: the file is not a readable ``torch.save`` checkpoint.
    """
    path = Path(path)
    allowed = {_global_name(cls) for cls in REFERENCE_ALLOWED_GLOBALS}
    try:
        # Static scan: reports every offending global at once, executes nothing.
        offending = pickle_globals_outside(path, allowed)
    except ValueError:
        # Not a zip checkpoint (legacy torch.save format): the weights-only unpickler below is the guard.
        offending = []
    if offending:
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle: it references {', '.join(offending)}, outside the allow-list "
            f"(tensors, containers, {', '.join(sorted(allowed))}). A reference checkpoint only holds tensors and "
            "an argparse.Namespace; this file may run code when loaded unsafely. Do not load it with "
            "weights_only=False."
        )
    try:
        with torch.serialization.safe_globals(list(REFERENCE_ALLOWED_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        names = _globals_named_in_error(error)
        what = f"it references {', '.join(names)}" if names else f"the weights-only unpickler refused it ({error})"
        raise UnsafeCheckpointError(
            f"{path}: refusing to unpickle: {what}, outside the allow-list "
            f"(tensors, containers, {', '.join(sorted(allowed))})."
        ) from error
    except (RuntimeError, EOFError, OSError) as error:
        raise CheckpointFormatError(f"{path}: not a readable torch.save checkpoint: {error}") from error


def detect_layout(keys: Mapping[str, Any] | list[str]) -> Layout:
    """Name the layout of a model state dict from its keys (see :class:`SourceCheckpoint`)."""
    keys = list(keys)
    if any(k.startswith(_CLOVE_PREFIXES) for k in keys):
        return "clove_timm"
    if any(k.startswith(_REFERENCE_PREFIXES) for k in keys):
        return "reference"
    return "backbone"


def _tensor_dict(obj: Any, *, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointFormatError(f"{where}: expected a non-empty mapping of parameter names to tensors")
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointFormatError(f"{where}: entry {key!r} is {type(value).__name__}, expected a tensor")
    return dict(obj)


def _reference_metadata(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    metadata = {}
    if isinstance(checkpoint.get("epoch"), int):
        metadata["epoch"] = str(checkpoint["epoch"])
    opt = checkpoint.get("opt")
    if isinstance(opt, argparse.Namespace):
        for name in ("arch", "model", "epochs", "aug", "dataset"):
            value = getattr(opt, name, None)
            if isinstance(value, (str, int, float)):
                metadata[f"opt.{name}"] = str(value)
    return metadata


def _load_reference(path: Path) -> SourceCheckpoint:
    sha256 = sha256_file(path)
    checkpoint = load_reference_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or "model" not in checkpoint:
        found = sorted(checkpoint) if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointFormatError(
            f"{path}: expected a reference checkpoint dict with a 'model' entry (keys opt, model, optimizer, "
            f"scaler, epoch); found {found}"
        )
    state_dict = _tensor_dict(checkpoint["model"], where=f"{path}['model']")
    layout = detect_layout(state_dict)
    if layout != "reference":
        raise CheckpointFormatError(
            f"{path}: 'model' has no reference encoder keys (module.encoder.*); first keys: {list(state_dict)[:3]}"
        )
    return SourceCheckpoint(path, sha256, layout, state_dict, _reference_metadata(checkpoint))


def _load_safetensors(path: Path) -> SourceCheckpoint:
    sha256 = sha256_file(path)
    try:
        state_dict = safetensors.torch.load_file(str(path), device="cpu")
        metadata = read_safetensors_metadata(path)
    except Exception as error:  # safetensors raises its own SafetensorError and OSError variants
        raise CheckpointFormatError(f"{path}: not a readable safetensors file: {error}") from error
    state_dict = _tensor_dict(state_dict, where=str(path))
    return SourceCheckpoint(path, sha256, detect_layout(state_dict), state_dict, metadata)


# A pretraining checkpoint folder (``training/checkpoint.py``) is sealed by this manifest, written last; its
# ``trainer_state.json`` tells such a folder from any other folder holding a model.safetensors.
_TRAINING_MANIFEST = "COMPLETE"
_TRAINING_STATE = "trainer_state.json"


def _check_training_manifest(folder: Path, source: SourceCheckpoint) -> None:
    """Refuse a pretraining checkpoint folder that was not sealed, or whose weights differ from its manifest."""
    marker = folder / _TRAINING_MANIFEST
    if not marker.is_file():
        if (folder / _TRAINING_STATE).is_file():
            raise CheckpointFormatError(
                f"{folder}: pretraining checkpoint without its {_TRAINING_MANIFEST} manifest (the run stopped while "
                "saving it?); export a complete checkpoint"
            )
        return
    try:
        entry = json.loads(marker.read_text())["files"][SAFETENSORS_NAME]
        size, digest = int(entry["size"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointFormatError(f"{marker}: no usable entry for {SAFETENSORS_NAME} ({error})") from error
    if source.path.stat().st_size != size or source.sha256 != digest:
        raise CheckpointFormatError(
            f"{source.path}: does not match the size and sha256 recorded in {marker}; the checkpoint is damaged"
        )


def load_source_checkpoint(src: str | Path) -> SourceCheckpoint:
    """Read any accepted pretraining checkpoint (see the module docstring) without executing code from it.

    Args:
        src: a checkpoint directory holding ``model.safetensors``, a ``.safetensors`` file, or a reference
            ``.pth`` / ``.pth.tar`` file.

    Returns:
        The checkpoint's tensors, layout, hash and self-description.

    Raises:
        FileNotFoundError: ``src`` does not exist, or a directory lacks ``model.safetensors``.
        UnsafeCheckpointError: a pickle references a global outside the allow-list.
        CheckpointFormatError: the file's format or structure is not one of the accepted ones, or a pretraining
            checkpoint folder is unsealed or does not match its ``COMPLETE`` manifest.
    """
    src = Path(src)
    if src.is_dir():
        path = src / SAFETENSORS_NAME
        if not path.is_file():
            present = sorted(p.name for p in src.iterdir())[:10]
            raise FileNotFoundError(
                f"{src}: checkpoint directory without {SAFETENSORS_NAME} (contains {present}); "
                "pass the file itself for other formats"
            )
        source = _load_safetensors(path)
        _check_training_manifest(src, source)
        return source
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file or directory")
    if src.name.endswith(".safetensors"):
        return _load_safetensors(src)
    if src.name.endswith(_REFERENCE_SUFFIXES):
        return _load_reference(src)
    raise CheckpointFormatError(
        f"{src}: unknown checkpoint type; expected a directory with {SAFETENSORS_NAME}, a .safetensors file, "
        f"or a reference checkpoint ({', '.join(_REFERENCE_SUFFIXES)})"
    )


SHA256SUMS_NAME = "SHA256SUMS"


class ChecksumError(ValueError):
    """A folder's files do not match its ``SHA256SUMS``."""


def _folder_files(folder: Path) -> list[str]:
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != SHA256SUMS_NAME
    )


def write_sha256sums(folder: str | Path) -> Path:
    """Write ``SHA256SUMS`` for every file of ``folder`` (recursively), in ``sha256sum -c`` format.

    Returns:
        The path of the written ``SHA256SUMS``.
    """
    folder = Path(folder)
    lines = [f"{sha256_file(folder / name)}  {name}\n" for name in _folder_files(folder)]
    path = folder / SHA256SUMS_NAME
    path.write_text("".join(lines), encoding="utf-8")
    return path


def verify_sha256sums(folder: str | Path) -> dict[str, str]:
    """Check that ``folder/SHA256SUMS`` lists exactly the folder's files, with matching digests.

    Returns:
        The verified digests, keyed by relative path.

    Raises:
        ChecksumError: ``SHA256SUMS`` is missing or malformed, a listed file is missing or differs, or a file is
            not listed (the message names each).
    """
    folder = Path(folder)
    sums_path = folder / SHA256SUMS_NAME
    if not sums_path.is_file():
        raise ChecksumError(f"{folder}: no {SHA256SUMS_NAME}; export the folder with hub.export to create it")
    expected: dict[str, str] = {}
    for number, line in enumerate(sums_path.read_text(encoding="utf-8").splitlines(), start=1):
        match = re.fullmatch(r"([0-9a-f]{64}) [ *](.+)", line)
        if match is None:
            raise ChecksumError(f"{sums_path}:{number}: not a '<sha256>  <file>' line: {line!r}")
        expected[match.group(2)] = match.group(1)
    problems = []
    for name, digest in expected.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed but missing")
        elif sha256_file(path) != digest:
            problems.append(f"{name}: sha256 differs from {SHA256SUMS_NAME}")
    problems += [f"{name}: not listed in {SHA256SUMS_NAME}" for name in _folder_files(folder) if name not in expected]
    if problems:
        raise ChecksumError(f"{folder}: checksum verification failed: " + "; ".join(problems))
    return expected
