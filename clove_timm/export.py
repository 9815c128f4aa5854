"""Export a pretrained CLoVE backbone: the Hub folder timm loads, and Detectron2 / torchvision / mmdetection files.

A source checkpoint (see :func:`clove_timm.checkpoint_io.load_source_checkpoint`) holds the whole pretraining
model. Export keeps one backbone branch (the student by default: the reference code releases
``module.encoder.*``), strips its prefix so the keys are timm's, and strictly loads the result into
``timm.create_model(arch, num_classes=0)`` before anything is written. Each ``export_*`` function writes a new
folder atomically (a staging directory renamed into place), verifies what it wrote, and leaves nothing behind when
any step fails.

Formats:

- ``timm`` (:func:`export_timm_folder`): ``model.safetensors`` + timm's hub ``config.json`` + model card
  ``README.md`` + ``SHA256SUMS``; loads with ``timm.create_model('hf-hub:ORG/NAME')`` or ``'local-dir:DIR'``
  without clove_timm installed.
- ``detectron2`` (:func:`to_detectron2`): a pickle of numpy arrays with Detectron2's ResNet names (method doc
  section 7).
- ``torchvision`` (:func:`to_torchvision`): a state dict ``torchvision.models.<arch>()`` loads with only ``fc.*``
  missing.
- ``mmdetection`` (:func:`to_mmdetection`): ``{'state_dict', 'meta'}`` for a backbone ``init_cfg`` of type
  ``Pretrained``; mmdetection's ``ResNet`` uses torchvision's parameter names.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import safetensors.torch
import timm
import torch
from torch import nn

from clove_timm import __version__
from clove_timm.checkpoint_io import (
    SAFETENSORS_NAME,
    CheckpointFormatError,
    Layout,
    SourceCheckpoint,
    load_source_checkpoint,
    sha256_file,
    verify_sha256sums,
    write_sha256sums,
)
from clove_timm.model_card import REFERENCE_RECIPE, CardFacts, build_model_card
from clove_timm.registry import CLOVE_TAGS, clove_pretrained_cfg, hf_org

__all__ = [
    "EXPORT_FORMATS",
    "Branch",
    "ExportFormat",
    "ExportVerificationError",
    "PreparedBackbone",
    "backbone_state_dict",
    "export_checkpoint",
    "export_detectron2",
    "export_mmdetection",
    "export_timm_folder",
    "export_torchvision",
    "hub_config",
    "prepare_backbone",
    "to_detectron2",
    "to_mmdetection",
    "to_torchvision",
]

_logger = logging.getLogger(__name__)

Branch = Literal["student", "teacher"]
ExportFormat = Literal["timm", "detectron2", "torchvision", "mmdetection"]
EXPORT_FORMATS: tuple[str, ...] = get_args(ExportFormat)

# Backbone key prefixes per source layout and branch. CLoVEModel: `student.backbone.` / `teacher.backbone.`;
# reference model (method doc section 5): `encoder.` is the student, `encoder_k.` the EMA teacher, under DDP's
# `module.` when saved from the training run.
_BRANCH_PREFIXES: dict[str, dict[str, tuple[str, ...]]] = {
    "clove_timm": {"student": ("student.backbone.",), "teacher": ("teacher.backbone.",)},
    "reference": {"student": ("module.encoder.", "encoder."), "teacher": ("module.encoder_k.", "encoder_k.")},
}

# Verification input: (B, C, H, W) = (2, 3, 64, 64) from a fixed seed; small enough for CPU, large enough that every
# stage of a ResNet sees a spatial map (64 / 32 = 2).
_VERIFY_SHAPE = (2, 3, 64, 64)
_VERIFY_SEED = 0


class ExportVerificationError(RuntimeError):
    """What was written does not reproduce the source backbone."""


@dataclass(frozen=True)
class PreparedBackbone:
    """A source checkpoint reduced to one backbone, checked against the timm architecture.

    Attributes:
        source: the checkpoint read.
        arch: timm architecture.
        branch: branch the backbone came from (``"student"``/``"teacher"``, or what a bare backbone recorded).
        state_dict: backbone tensors with timm's key names.
        model: ``timm.create_model(arch, num_classes=0)`` holding ``state_dict``, in eval mode.
    """

    source: SourceCheckpoint
    arch: str
    branch: str
    state_dict: dict[str, torch.Tensor]
    model: nn.Module


def backbone_state_dict(
    state_dict: Mapping[str, torch.Tensor], *, layout: Layout, branch: Branch = "student"
) -> dict[str, torch.Tensor]:
    """Select one backbone branch of a pretraining state dict and give it timm's key names.

    Args:
        state_dict: all tensors of the pretraining model.
        layout: ``"clove_timm"`` or ``"reference"`` (a ``"backbone"`` state dict is already a single backbone).
        branch: ``"student"`` (default; what the reference releases) or ``"teacher"`` (the EMA copy).

    Returns:
        The branch's backbone tensors, prefix stripped, projector/predictor heads dropped.

    Raises:
        CheckpointFormatError: the branch has no tensors in ``state_dict``.
        ValueError: unknown ``layout`` or ``branch``.
    """
    if layout not in _BRANCH_PREFIXES:
        raise ValueError(f"layout {layout!r} has no branches; expected one of {sorted(_BRANCH_PREFIXES)}")
    if branch not in ("student", "teacher"):
        raise ValueError(f"branch must be 'student' or 'teacher', got {branch!r}")
    for prefix in _BRANCH_PREFIXES[layout][branch]:
        selected = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if selected:
            return selected
    raise CheckpointFormatError(
        f"no {branch} backbone in the {layout} state dict: no key starts with "
        f"{' or '.join(_BRANCH_PREFIXES[layout][branch])}"
    )


def _check_against_model(backbone: Mapping[str, torch.Tensor], model: nn.Module, *, arch: str, where: str) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in backbone]
    unexpected = [k for k in backbone if k not in expected]
    mismatched = [
        f"{k}: {tuple(backbone[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in backbone and backbone[k].shape != v.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys (first: {missing[:5]})")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys (first: {unexpected[:5]})")
    if mismatched:
        problems.append(f"shape mismatch (source vs {arch}): {mismatched[:5]}")
    if problems:
        raise CheckpointFormatError(
            f"{where}: the backbone does not match timm '{arch}' (num_classes=0): " + "; ".join(problems)
        )


def prepare_backbone(
    src: str | Path, *, arch: str, branch: Branch | None = None, source: SourceCheckpoint | None = None
) -> PreparedBackbone:
    """Read ``src`` safely, select a branch and strictly load it into ``timm.create_model(arch, num_classes=0)``.

    Args:
        src: checkpoint directory, ``.safetensors`` file or reference ``.pth`` (see
            :func:`~clove_timm.checkpoint_io.load_source_checkpoint`).
        arch: timm architecture of the backbone.
        branch: ``"student"`` or ``"teacher"``; ``None`` means the student. For a bare backbone (an earlier
            export) the branch it recorded is kept, and an explicit different branch is an error.
        source: an already loaded ``src`` (skips reading it again).

    Returns:
        The prepared backbone.

    Raises:
        CheckpointFormatError: the branch is absent or its keys/shapes do not match ``arch``.
        UnsafeCheckpointError: a pickled source references globals outside the allow-list.
    """
    source = source or load_source_checkpoint(src)
    if source.layout == "backbone":
        recorded = source.metadata.get("branch")
        if branch is not None and branch != recorded:
            raise CheckpointFormatError(
                f"{source.path}: holds a single backbone (recorded branch: {recorded or 'none'}); "
                f"branch {branch!r} cannot be selected from it"
            )
        chosen, tensors = recorded or "unknown", dict(source.state_dict)
    else:
        chosen = branch or "student"
        tensors = backbone_state_dict(source.state_dict, layout=source.layout, branch=chosen)
    model = timm.create_model(arch, pretrained=False, num_classes=0)
    _check_against_model(tensors, model, arch=arch, where=str(source.path))
    model.load_state_dict(tensors, strict=True)
    model.eval()
    return PreparedBackbone(source=source, arch=arch, branch=chosen, state_dict=tensors, model=model)


# ---------------------------------------------------------------------------------------------------------------
# Converters to other frameworks


_DETECTRON2_KEY = re.compile(
    r"(stem\.conv1|res[2-5]\.\d+\.(conv[1-3]|shortcut))(\.norm)?\.(weight|bias|running_mean|running_var)"
)


def _detectron2_key(key: str) -> str:
    parts = key.split(".")
    stage = re.fullmatch(r"layer(\d)", parts[0])
    parts = [f"res{int(stage.group(1)) + 1}", *parts[1:]] if stage else ["stem", *parts]
    renamed = []
    for i, part in enumerate(parts):
        norm = re.fullmatch(r"bn(\d)", part)
        if norm:  # torchvision bnK follows convK; Detectron2 nests it: convK.norm
            renamed.append(f"conv{norm.group(1)}.norm")
        elif part == "downsample":  # downsample.0 is the 1x1 conv, downsample.1 its norm
            continue
        elif i > 0 and parts[i - 1] == "downsample":
            renamed.append({"0": "shortcut", "1": "shortcut.norm"}.get(part, f"shortcut.{part}"))
        else:
            renamed.append(part)
    return ".".join(renamed)


def to_detectron2(backbone: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Rename a torchvision-style ResNet backbone to Detectron2's ResNet names (method doc section 7).

    ``conv1``/``bn1`` become ``stem.conv1``/``stem.conv1.norm``; ``layerN`` becomes ``res{N+1}``; ``bnK`` becomes
    ``convK.norm``; ``downsample.0``/``downsample.1`` become ``shortcut``/``shortcut.norm``.
    ``num_batches_tracked`` is dropped (Detectron2's frozen and synchronised norms do not use it). Arrays are
    numpy, as Detectron2's own converted checkpoints store them.

    Args:
        backbone: timm/torchvision ResNet keys (``resnet18/34/50/101/152``-style plain stem, no classifier).

    Returns:
        Detectron2 key -> numpy array.

    Raises:
        ValueError: a key has no Detectron2 equivalent (a deep-stem or non-ResNet backbone, or a classifier).
    """
    out = {}
    for key, value in backbone.items():
        if key.endswith("num_batches_tracked"):
            continue
        new_key = _detectron2_key(key)
        if not _DETECTRON2_KEY.fullmatch(new_key):
            raise ValueError(
                f"key {key!r} has no Detectron2 ResNet name (got {new_key!r}); the Detectron2 export supports "
                "torchvision-style ResNets without classifier"
            )
        out[new_key] = value.detach().cpu().numpy()
    return out


def to_torchvision(backbone: Mapping[str, torch.Tensor], *, arch: str) -> dict[str, torch.Tensor]:
    """Check that ``torchvision.models.<arch>()`` takes a timm backbone unchanged, and return it.

    timm's ResNets use torchvision's parameter names, so the conversion is the identity; this function is the
    check: every key must exist in torchvision's model with the same shape, and only the classifier (``fc.*``) may
    be missing.

    Args:
        backbone: timm backbone tensors (no classifier).
        arch: torchvision model name (timm's ``resnet50`` is torchvision's ``resnet50``).

    Returns:
        A state dict for ``torchvision.models.get_model(arch).load_state_dict(sd, strict=False)``.

    Raises:
        ValueError: torchvision has no ``arch``, or keys/shapes differ beyond ``fc.*``.
    """
    import torchvision  # optional import: only this export needs it

    try:
        reference = torchvision.models.get_model(arch, weights=None).state_dict()
    except ValueError as error:
        raise ValueError(f"torchvision has no model {arch!r} to export to: {error}") from error
    missing = sorted(k for k in reference if k not in backbone and not k.startswith("fc."))
    unexpected = sorted(k for k in backbone if k not in reference)
    mismatched = [
        f"{k}: {tuple(v.shape)}" for k, v in backbone.items() if k in reference and v.shape != reference[k].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"backbone does not fit torchvision '{arch}': missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}"
        )
    return {k: v.detach().cpu().contiguous() for k, v in backbone.items()}


def to_mmdetection(
    backbone: Mapping[str, torch.Tensor], *, arch: str, meta: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Package a backbone for mmdetection's ``ResNet`` (``init_cfg=dict(type='Pretrained', checkpoint=...)``).

    mmdetection's ``ResNet`` (style ``'pytorch'``: stride in the 3x3 conv, as here) names its parameters like
    torchvision (``conv1``, ``bn1``, ``layerN.M.convK``/``bnK``, ``downsample.0/1``), so the tensors are those of
    :func:`to_torchvision`, under ``state_dict`` with string ``meta``, the layout mmengine's checkpoint loader
    reads.

    Args:
        backbone: timm backbone tensors.
        arch: torchvision/mmdetection ResNet name used for the key check.
        meta: strings recorded under ``meta``.

    Returns:
        ``{'state_dict': ..., 'meta': ...}``.
    """
    return {"state_dict": to_torchvision(backbone, arch=arch), "meta": dict(meta or {})}


# ---------------------------------------------------------------------------------------------------------------
# Writing folders


@contextlib.contextmanager
def _staged_folder(out_dir: Path) -> Iterator[Path]:
    """Yield an empty staging directory beside ``out_dir``; rename it to ``out_dir`` on success, delete it on error."""
    created_parents = [p for p in reversed(out_dir.parents) if not p.exists()]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=out_dir.parent))
    try:
        yield staging
        os.chmod(staging, 0o755)
        if out_dir.exists():
            shutil.rmtree(out_dir)  # empty, or overwrite=True (checked by _check_out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for parent in reversed(created_parents):
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _check_out_dir(out_dir: Path, *, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir}: directory is not empty; choose a new folder or pass overwrite=True")


def _verification_input() -> torch.Tensor:
    generator = torch.Generator().manual_seed(_VERIFY_SEED)
    return torch.randn(_VERIFY_SHAPE, generator=generator)


@torch.no_grad()
def _assert_same_features(expected: nn.Module, actual: nn.Module, *, what: str, atol: float) -> None:
    x = _verification_input()
    a = expected.eval().forward_features(x)  # (B, C, H/32, W/32)
    b = actual.eval().forward_features(x)
    if a.shape != b.shape:
        raise ExportVerificationError(f"{what}: feature shape {tuple(b.shape)} differs from {tuple(a.shape)}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ExportVerificationError(f"{what}: features on the verification input are not finite")
    max_diff = (a - b).abs().max().item()
    if not max_diff <= atol:
        raise ExportVerificationError(f"{what}: features differ from the source by {max_diff:.3g} (> {atol:g})")


def _safetensors_metadata(prepared: PreparedBackbone, *, name: str, epochs: int | None) -> dict[str, str]:
    metadata = {
        "format": "pt",
        "producer": "clove_timm",
        "producer_version": __version__,
        "model_name": name,
        "architecture": prepared.arch,
        "branch": prepared.branch,
        "source_file": prepared.source.path.name,
        "source_sha256": prepared.source.sha256,
        "source_layout": prepared.source.layout,
    }
    if epochs is not None:
        metadata["epochs"] = str(epochs)
    if "epoch" in prepared.source.metadata:
        metadata["source_epoch"] = prepared.source.metadata["epoch"]
    return metadata


def hub_config(name: str, *, num_features: int, epochs: int | None = None) -> dict[str, Any]:
    """timm's hub ``config.json`` for a CLoVE backbone (the layout ``timm.models.load_model_config_from_hf`` reads).

    Args:
        name: timm model name ``arch.tag``.
        num_features: channels of the backbone's final feature map (informational in timm).
        epochs: pretraining epochs for the description.

    Returns:
        ``{'architecture', 'num_classes': 0, 'num_features', 'global_pool', 'pretrained_cfg'}``; the pretrained
        config is :func:`~clove_timm.registry.clove_pretrained_cfg` without weight locations except the weights
        file name, so a Hub load reads ``model.safetensors`` and never probes for a pickle.
    """
    cfg = clove_pretrained_cfg(name, epochs=epochs)
    pretrained = cfg.to_dict(remove_source=True)
    pretrained["hf_hub_filename"] = SAFETENSORS_NAME
    return {
        "architecture": pretrained.pop("architecture"),
        "num_classes": 0,
        "num_features": num_features,
        "global_pool": "avg",
        "pretrained_cfg": pretrained,
    }


def _arch_of(name: str, arch: str | None) -> str:
    if arch:
        return arch
    prefix, sep, tag = name.partition(".")
    if not sep or not prefix or not tag:
        raise ValueError(f"model name {name!r} must be 'arch.tag' (e.g. 'resnet50.clove_in1k'), or pass arch")
    return prefix


def _epochs_of(prepared: PreparedBackbone, name: str, epochs: int | None) -> int | None:
    """Pretraining epochs for the card: explicit, else what the source records, else the released tag's."""
    if epochs is not None:
        return epochs
    released = CLOVE_TAGS[name].epochs if name in CLOVE_TAGS else None
    for key in ("epochs", "epoch"):  # an earlier export records `epochs`, a reference checkpoint its `epoch`
        value = prepared.source.metadata.get(key)
        if value is not None and value.isdigit():
            if released is not None and int(value) != released:
                _logger.warning(
                    "%s records %s epochs but %s is the %d-epoch release; the card states %s",
                    prepared.source.path,
                    value,
                    name,
                    released,
                    value,
                )
            return int(value)
    return released


def export_timm_folder(
    src: str | Path,
    out_dir: str | Path,
    *,
    branch: Branch | None = None,
    name: str = "resnet50.clove_in1k",
    arch: str | None = None,
    org: str | None = None,
    epochs: int | None = None,
    dataset: str = "imagenet-1k",
    recipe: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a Hub-ready timm folder for one backbone of a pretraining checkpoint.

    The folder holds ``model.safetensors`` (backbone only, timm keys, metadata with the source's sha256, the branch
    and the exporter version), ``config.json`` (timm's hub format), ``README.md`` (model card) and ``SHA256SUMS``.
    Before the folder is moved into place it is loaded back through timm's own ``local-dir:`` loader (strict)
    and its features on a fixed input are compared with the backbone built directly from the source tensors.

    Args:
        src: checkpoint directory (``model.safetensors`` inside), ``.safetensors`` file or reference ``.pth``.
        out_dir: folder to create; must not exist or be empty unless ``overwrite``.
        branch: ``"student"`` (default, what the reference releases) or ``"teacher"``.
        name: timm model name ``arch.tag``; also the Hub repository name.
        arch: timm architecture; default: the part of ``name`` before the dot.
        org: Hub organisation written into the card's load lines; default: the configured one.
        epochs: pretraining epochs; default: what the source records (a reference checkpoint's ``epoch``, an earlier
            export's ``epochs``), else the released tag's.
        dataset: Hub id of the pretraining data set, for the card.
        recipe: recipe paragraph for the card; default: the reference recipe (method doc sections 3 to 5).
        overwrite: replace a non-empty ``out_dir``.

    Returns:
        ``out_dir``.

    Raises:
        UnsafeCheckpointError: a pickled source references globals outside the allow-list (nothing written).
        CheckpointFormatError: the source does not hold a matching backbone (nothing written).
        ExportVerificationError: the written folder does not reproduce the source (nothing left behind).
        FileExistsError: ``out_dir`` is a file or a non-empty directory.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite)
    arch = _arch_of(name, arch)
    prepared = prepare_backbone(src, arch=arch, branch=branch)
    epochs = _epochs_of(prepared, name, epochs)
    org = org or hf_org()
    with _staged_folder(out_dir) as staging:
        weights = staging / SAFETENSORS_NAME
        tensors = {k: v.detach().cpu().contiguous() for k, v in prepared.state_dict.items()}
        safetensors.torch.save_file(
            tensors, weights, metadata=_safetensors_metadata(prepared, name=name, epochs=epochs)
        )
        config = hub_config(name, num_features=prepared.model.num_features, epochs=epochs)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        facts = CardFacts(
            name=name,
            repo_id=f"{org}/{name}",
            arch=arch,
            epochs=epochs,
            dataset=dataset,
            recipe=recipe or REFERENCE_RECIPE,
            branch=prepared.branch,
            source_layout=prepared.source.layout,
            source_sha256=prepared.source.sha256,
            weights_sha256=sha256_file(weights),
            param_count=sum(p.numel() for p in prepared.model.parameters()),
            # feature_info[0] is the stem (stride 2); 1..4 are the stages detectors use (strides 4..32).
            feature_channels=tuple(info["num_chs"] for info in prepared.model.feature_info[1:5]),
            exporter_version=__version__,
        )
        build_model_card(facts).save(staging / "README.md")
        write_sha256sums(staging)
        _verify_timm_folder(staging, prepared)
    _logger.info("wrote %s (%s %s branch of %s)", out_dir, arch, prepared.branch, prepared.source.path)
    return out_dir


def _verify_timm_folder(folder: Path, prepared: PreparedBackbone) -> None:
    verify_sha256sums(folder)
    # timm's own loader: config.json -> architecture and num_classes, model.safetensors -> strict load.
    loaded = timm.create_model(f"local-dir:{folder}", pretrained=True)
    state = loaded.state_dict()
    differing = [k for k, v in prepared.state_dict.items() if k not in state or not torch.equal(state[k], v)]
    if differing or len(state) != len(prepared.state_dict):
        raise ExportVerificationError(f"{folder}: reloaded weights differ from the source: {differing[:5]}")
    _assert_same_features(prepared.model, loaded, what=f"{folder} via local-dir", atol=1e-6)


def _write_single_file(
    out_dir: Path, filename: str, write: Callable[[Path], None], verify: Callable[[Path], None]
) -> Path:
    with _staged_folder(out_dir) as staging:
        write(staging / filename)
        write_sha256sums(staging)
        verify(staging / filename)
    return out_dir


def export_detectron2(
    src: str | Path,
    out_dir: str | Path,
    *,
    branch: Branch | None = None,
    name: str = "resnet50.clove_in1k",
    arch: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``OUT_DIR/<name>.detectron2.pkl`` (+ ``SHA256SUMS``) for Detectron2's ``MODEL.WEIGHTS``.

    The pickle is ``{"model": {name: ndarray}, "__author__": "clove_timm", "matching_heuristics": True}``
    (see :func:`to_detectron2`); ``matching_heuristics`` lets Detectron2 match ``res5`` inside an R50-C4 ROI head
    and the ``backbone.bottom_up.`` prefix of FPN. Use it with the SSL transfer settings of method doc section 7
    (``docs/weights.md`` gives the config lines).

    Args and Raises: as :func:`export_timm_folder`.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite)
    prepared = prepare_backbone(src, arch=_arch_of(name, arch), branch=branch)
    converted = to_detectron2(prepared.state_dict)
    payload = {"model": converted, "__author__": f"clove_timm {__version__}", "matching_heuristics": True}

    def write(path: Path) -> None:
        with open(path, "wb") as f:
            pickle.dump(payload, f)

    def verify(path: Path) -> None:
        # Reads back the file written a moment ago into the private staging folder, so unpickling it is safe.
        with open(path, "rb") as f:
            reread = pickle.load(f)
        model = reread.get("model", {})
        bad = [k for k, v in converted.items() if k not in model or not np.array_equal(model[k], v)]
        if bad or len(model) != len(converted):
            raise ExportVerificationError(f"{path}: Detectron2 weights differ after writing: {bad[:5]}")

    return _write_single_file(out_dir, f"{name}.detectron2.pkl", write, verify)


def export_torchvision(
    src: str | Path,
    out_dir: str | Path,
    *,
    branch: Branch | None = None,
    name: str = "resnet50.clove_in1k",
    arch: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``OUT_DIR/<name>.torchvision.pth`` (+ ``SHA256SUMS``): a plain tensor state dict.

    Load with ``torchvision.models.resnet50().load_state_dict(torch.load(path, weights_only=True), strict=False)``;
    only ``fc.weight``/``fc.bias`` are missing. Verified after writing: the torchvision model's pooled features
    equal the timm backbone's.

    Args and Raises: as :func:`export_timm_folder`.

    Returns:
        ``out_dir``.
    """
    import torchvision

    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite)
    arch = _arch_of(name, arch)
    prepared = prepare_backbone(src, arch=arch, branch=branch)
    converted = to_torchvision(prepared.state_dict, arch=arch)

    def verify(path: Path) -> None:
        model = torchvision.models.get_model(arch, weights=None)
        result = model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=False)
        if sorted(result.missing_keys) != ["fc.bias", "fc.weight"] or result.unexpected_keys:
            raise ExportVerificationError(
                f"{path}: torchvision load left missing {result.missing_keys} unexpected {result.unexpected_keys}"
            )
        model.fc = nn.Identity()
        with torch.no_grad():
            x = _verification_input()
            diff = (model.eval()(x) - prepared.model(x)).abs().max().item()
        if not diff <= 1e-4:
            raise ExportVerificationError(f"{path}: torchvision features differ from timm's by {diff:.3g}")

    return _write_single_file(out_dir, f"{name}.torchvision.pth", lambda p: torch.save(converted, p), verify)


def export_mmdetection(
    src: str | Path,
    out_dir: str | Path,
    *,
    branch: Branch | None = None,
    name: str = "resnet50.clove_in1k",
    arch: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``OUT_DIR/<name>.mmdet.pth`` (+ ``SHA256SUMS``) for an mmdetection backbone ``init_cfg``.

    Args and Raises: as :func:`export_timm_folder`.

    Returns:
        ``out_dir``.
    """
    out_dir = Path(out_dir)
    _check_out_dir(out_dir, overwrite=overwrite)
    arch = _arch_of(name, arch)
    prepared = prepare_backbone(src, arch=arch, branch=branch)
    meta = {
        "producer": f"clove_timm {__version__}",
        "model_name": name,
        "branch": prepared.branch,
        "source_sha256": prepared.source.sha256,
    }
    converted = to_mmdetection(prepared.state_dict, arch=arch, meta=meta)

    def verify(path: Path) -> None:
        reread = torch.load(path, map_location="cpu", weights_only=True)
        state = reread.get("state_dict", {})
        bad = [k for k, v in prepared.state_dict.items() if k not in state or not torch.equal(state[k], v)]
        if bad or len(state) != len(prepared.state_dict):
            raise ExportVerificationError(f"{path}: mmdetection weights differ after writing: {bad[:5]}")

    return _write_single_file(out_dir, f"{name}.mmdet.pth", lambda p: torch.save(converted, p), verify)


def export_checkpoint(src: str | Path, out_dir: str | Path, *, format: ExportFormat = "timm", **kwargs: Any) -> Path:
    """Export ``src`` in one of :data:`EXPORT_FORMATS` (the entry point of ``python -m hub.export``).

    Args:
        src: source checkpoint.
        out_dir: folder to create.
        format: ``"timm"`` (:func:`export_timm_folder`), ``"detectron2"``, ``"torchvision"`` or ``"mmdetection"``.
        **kwargs: keyword arguments of the chosen ``export_*`` function.

    Returns:
        ``out_dir``.
    """
    exporters = {
        "timm": export_timm_folder,
        "detectron2": export_detectron2,
        "torchvision": export_torchvision,
        "mmdetection": export_mmdetection,
    }
    if format not in exporters:
        raise ValueError(f"unknown export format {format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    return exporters[format](src, out_dir, **kwargs)
