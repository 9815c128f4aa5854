"""CLoVE pretrained tags on timm's existing architectures.

Importing :mod:`clove_timm` registers ``resnet50.clove_in1k`` (400 epochs), ``resnet50.clove_ep200_in1k`` and
``resnet50.clove_ep50_in1k`` as extra pretrained tags of timm's own ``resnet50``, so that
``timm.create_model('resnet50.clove_in1k', pretrained=True)`` downloads the headless backbone from the Hugging Face
Hub (safetensors only). timm's own tags and defaults are left untouched: plain ``resnet50`` still resolves to timm's
default weights.

timm has no public API for adding a tag to an architecture that is already registered (``register_model`` would
replace the whole entry point and drop every other tag), so this module writes to the private tables of
``timm.models._registry``. It is the only module of the package that does so; :func:`check_timm_registry` states
the assumptions and fails with a :class:`TimmRegistryError` that names the broken one, and
``tests/test_registry.py`` pins them.

The Hub organisation is :data:`DEFAULT_HF_ORG`, overridable with the environment variable named by
:data:`HF_ORG_ENV`; a tag's ``hf_hub_id`` is ``<org>/<arch>.<tag>`` (timm's own naming, e.g.
``timm/resnet50.a1_in1k``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import deque
from dataclasses import dataclass

import timm
from timm.models import _registry as _timm_registry
from timm.models._pretrained import DefaultCfg, PretrainedCfg

__all__ = [
    "CLOVE_TAGS",
    "DEFAULT_HF_ORG",
    "HF_ORG_ENV",
    "CloveTag",
    "TimmRegistryError",
    "check_timm_registry",
    "clove_pretrained_cfg",
    "hf_org",
    "register_pretrained_tags",
]

_logger = logging.getLogger(__name__)

DEFAULT_HF_ORG = "clove-timm"
"""Hugging Face organisation that hosts the published CLoVE weights."""

HF_ORG_ENV = "CLOVE_TIMM_HF_ORG"
"""Environment variable that replaces :data:`DEFAULT_HF_ORG` (mirrors, private orgs, tests)."""

PAPER_NAME = "Self-supervised Learning of Contextualized Local Visual Embeddings"
PAPER_ID = "arXiv:2310.00527"
ORIGIN_URL = "https://github.com/sthalles/CLoVE"
LICENSE = "mit"  # licence of the reference code and its released weights
SAFETENSORS_FILENAME = "model.safetensors"


@dataclass(frozen=True)
class CloveTag:
    """One released CLoVE checkpoint.

    Attributes:
        arch: timm architecture the backbone loads into.
        tag: pretrained tag, so the timm model name is ``f"{arch}.{tag}"``.
        epochs: ImageNet-1k pretraining epochs (method doc section 5: released checkpoints at 50, 200, 400).
    """

    arch: str
    tag: str
    epochs: int

    @property
    def name(self) -> str:
        """The timm model name, ``arch.tag``."""
        return f"{self.arch}.{self.tag}"


CLOVE_TAGS: dict[str, CloveTag] = {
    t.name: t
    for t in (
        CloveTag(arch="resnet50", tag="clove_in1k", epochs=400),
        CloveTag(arch="resnet50", tag="clove_ep200_in1k", epochs=200),
        CloveTag(arch="resnet50", tag="clove_ep50_in1k", epochs=50),
    )
}
"""The released checkpoints, keyed by timm model name. The un-suffixed tag is the 400-epoch one, the paper's
headline model."""


class TimmRegistryError(RuntimeError):
    """timm's private model registry no longer has the layout this module writes to."""


def hf_org() -> str:
    """The Hub organisation for CLoVE weights: ``$CLOVE_TIMM_HF_ORG`` if set and non-empty, else the default."""
    return os.environ.get(HF_ORG_ENV) or DEFAULT_HF_ORG


def clove_pretrained_cfg(
    name: str,
    *,
    org: str | None = None,
    epochs: int | None = None,
    description: str | None = None,
) -> PretrainedCfg:
    """Build the timm pretrained config of a CLoVE backbone.

    The same config serves the registry tag and the ``config.json`` written by the export, so that
    ``resnet50.clove_in1k`` and ``hf-hub:<org>/resnet50.clove_in1k`` describe the weights identically.

    Args:
        name: timm model name ``arch.tag``. Known tags (:data:`CLOVE_TAGS`) supply their epochs.
        org: Hub organisation; ``None`` means :func:`hf_org`.
        epochs: pretraining epochs, required for names outside :data:`CLOVE_TAGS` to appear in the description.
        description: replaces the generated one-line description.

    Returns:
        A headless config: ``num_classes=0`` with ``classifier='fc'`` (so ``num_classes=N`` at creation gets a
        fresh classifier), ImageNet mean/std and 224 px input (the pretraining normalisation and global-view size,
        method doc section 3), bicubic resize (the pretraining crops' interpolation).

    Raises:
        ValueError: if ``name`` has no ``.tag`` part.
    """
    arch, sep, tag = name.partition(".")
    if not sep or not arch or not tag:
        raise ValueError(f"model name {name!r} must be 'arch.tag', e.g. 'resnet50.clove_in1k'")
    known = CLOVE_TAGS.get(name)
    if epochs is None and known is not None:
        epochs = known.epochs
    if description is None:
        recipe = f"{epochs}-epoch " if epochs else ""
        description = f"CLoVE self-supervised {recipe}ImageNet-1k pretraining; backbone without classifier."
    return PretrainedCfg(
        hf_hub_id=f"{org or hf_org()}/{name}",
        hf_hub_filename=SAFETENSORS_FILENAME,
        architecture=arch,
        tag=tag,
        input_size=(3, 224, 224),
        interpolation="bicubic",
        crop_pct=0.875,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
        num_classes=0,
        pool_size=(7, 7),
        first_conv="conv1",
        classifier="fc",
        license=LICENSE,
        description=description,
        origin_url=ORIGIN_URL,
        paper_name=PAPER_NAME,
        paper_ids=PAPER_ID,
    )


# Private timm registry tables written by `register_pretrained_tags`, with the container type each must have.
_REGISTRY_TABLES: dict[str, type] = {
    "_model_entrypoints": dict,
    "_model_pretrained_cfgs": dict,
    "_model_has_pretrained": set,
    "_model_with_tags": dict,
    "_model_default_cfgs": dict,
}


def _registry_error(what: str) -> TimmRegistryError:
    return TimmRegistryError(
        f"timm {timm.__version__} changed its private model registry (timm.models._registry): {what}. "
        "clove_timm adds its pretrained tags to existing architectures through these tables; "
        "update clove_timm/registry.py for this timm version (or pin timm to a version the tests pass with)."
    )


def check_timm_registry(arch: str = "resnet50") -> None:
    """Check that timm's private registry has the layout :func:`register_pretrained_tags` relies on.

    Args:
        arch: an architecture that must already be registered with at least one pretrained tag.

    Raises:
        TimmRegistryError: naming the table or invariant that changed.
    """
    for table, kind in _REGISTRY_TABLES.items():
        value = getattr(_timm_registry, table, None)
        if not isinstance(value, kind):
            raise _registry_error(f"`{table}` is {type(value).__name__}, expected {kind.__name__}")
    fields = {f.name for f in dataclasses.fields(PretrainedCfg)}
    missing = {"hf_hub_id", "hf_hub_filename", "architecture", "tag", "num_classes", "classifier"} - fields
    if missing:
        raise _registry_error(f"PretrainedCfg lacks fields {sorted(missing)}")
    if arch not in _timm_registry._model_entrypoints:
        raise _registry_error(f"architecture {arch!r} is not in `_model_entrypoints`")
    default_cfg = _timm_registry._model_default_cfgs.get(arch)
    if not isinstance(default_cfg, DefaultCfg) or not isinstance(default_cfg.tags, deque):
        raise _registry_error(f"`_model_default_cfgs[{arch!r}]` is not a DefaultCfg with a deque of tags")
    tagged = _timm_registry._model_with_tags.get(arch)
    if not isinstance(tagged, list) or not all(isinstance(n, str) and n.startswith(arch) for n in tagged):
        raise _registry_error(f"`_model_with_tags[{arch!r}]` is not a list of '{arch}.tag' names")
    default_name = f"{arch}.{default_cfg.tags[0]}" if default_cfg.tags and default_cfg.tags[0] else arch
    if not isinstance(_timm_registry._model_pretrained_cfgs.get(default_name), PretrainedCfg):
        raise _registry_error(f"`_model_pretrained_cfgs[{default_name!r}]` is not a PretrainedCfg")


def _add_tag(cfg: PretrainedCfg) -> None:
    """Add (or replace) one ``arch.tag`` entry, after timm's own tags so the architecture default is unchanged."""
    arch, tag = cfg.architecture, cfg.tag
    name = f"{arch}.{tag}"
    default_cfg: DefaultCfg = _timm_registry._model_default_cfgs[arch]
    default_cfg.cfgs[tag] = cfg
    if tag not in default_cfg.tags:
        default_cfg.tags.append(tag)
    default_cfg.is_pretrained = True
    _timm_registry._model_pretrained_cfgs[name] = cfg
    _timm_registry._model_has_pretrained.add(name)
    tagged = _timm_registry._model_with_tags[arch]
    if name not in tagged:
        tagged.append(name)


def register_pretrained_tags(*, org: str | None = None) -> tuple[str, ...]:
    """Register every tag of :data:`CLOVE_TAGS` with timm.

    Idempotent: calling it again (for example after changing ``$CLOVE_TIMM_HF_ORG``) replaces the configs of the
    CLoVE tags in place and adds nothing twice. timm's own tags and each architecture's default tag are unchanged.

    Args:
        org: Hub organisation; ``None`` means :func:`hf_org`.

    Returns:
        The registered model names.

    Raises:
        TimmRegistryError: if timm's private registry layout changed (see :func:`check_timm_registry`).
    """
    for arch in sorted({t.arch for t in CLOVE_TAGS.values()}):
        check_timm_registry(arch)
    for name in CLOVE_TAGS:
        _add_tag(clove_pretrained_cfg(name, org=org))
    _logger.debug("registered CLoVE pretrained tags %s", list(CLOVE_TAGS))
    return tuple(CLOVE_TAGS)
