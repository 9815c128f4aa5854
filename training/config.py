"""Pretraining configuration: one frozen dataclass, YAML recipes, ``key=value`` overrides.

A recipe is a YAML file in ``training/recipes/`` (or any path) whose keys are fields of :class:`PretrainConfig`,
plus an optional ``inherit: <recipe>`` to start from another recipe;
command-line ``key=value`` pairs override it (values parsed as YAML: ``epochs=50``, ``global_scale=[0.2,1.0]``,
``max_steps=null``). Unknown keys are errors. The resolved config is written next to each run's outputs.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPES_DIR = Path(__file__).parent / "recipes"


@dataclass(frozen=True)
class PretrainConfig:
    """Every setting of a pretraining run. Defaults are the paper's ResNet-50 recipe (method doc section 5)."""

    # Run
    output_dir: str = "runs/clove"
    seed: int = 0
    resume: str = "auto"  # "auto": newest complete checkpoint in output_dir; "none"; or a checkpoint path
    trust_checkpoint: bool = False  # allow resuming from a checkpoint outside output_dir
    max_steps: int | None = None  # stop after this many optimizer steps (smoke runs); the schedules keep `epochs`
    cpu: bool = False  # run on CPU even where an accelerator is present
    mixed_precision: str | None = None  # "no" | "fp16" | "bf16"; None: what `accelerate launch` was told
    compile: bool = False  # torch.compile the model
    channels_last: bool = True  # channels-last memory format (applied on CUDA only)
    sync_batchnorm: bool = True  # SyncBatchNorm (applied on CUDA with more than one process only)

    # Data
    data: str = "procedural"  # an image-folder path, "wds:<shard urls>", "hf:<dataset>[:split]", or "procedural"
    num_workers: int = 8  # DataLoader workers per process
    procedural_images: int = 4096  # size of the procedural data set
    procedural_image_size: int = 96
    procedural_classes: int = 5
    streaming_samples_per_epoch: int = 1281167  # epoch length of a streaming source (ImageNet-1k train)
    max_bad_fraction: float = 0.01  # stop when more than this fraction of an image folder's files cannot be used
    max_image_pixels: int = 89_478_485  # refuse larger images from their header (Pillow's MAX_IMAGE_PIXELS)

    # Views (method doc section 3)
    global_size: int = 224
    local_size: int = 96
    num_local: int = 6
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_scale: tuple[float, float] = (0.08, 0.3)

    # Model (method doc section 2)
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    proj_hidden_dim: int = 4096
    embed_dim: int = 256
    num_heads: int = 8
    normalize_qk: bool = True  # NMHSA (paper); False: nn.MultiheadAttention (reference code)
    attn_temperature: float = 0.2

    # Loss (method doc section 4)
    pos_ratio: float = 0.7
    pos_weight: float = 2.0
    margin: float = 100.0
    num_negatives: int = 10
    objective: str = "ranking"  # "ranking" | "l2"
    negatives: str = "intra"  # "intra" | "inter" | "inter_avg"
    queue_size: int = 16384

    # Optimisation (method doc section 5)
    epochs: int = 400
    global_batch_size: int | None = 2048  # None: batch_size * processes * grad_accum_steps
    batch_size: int = 256  # per process and micro-step; the largest that fits when global_batch_size is set
    grad_accum_steps: int = 1  # used only when global_batch_size is None
    base_lr: float = 1.0  # scaled by global_batch_size / lr_reference_batch
    lr_reference_batch: int = 256
    warmup_epochs: float = 5.0
    warmup_start_factor: float = 0.01
    final_lr_factor: float = 0.01
    weight_decay: float = 2e-5
    sgd_momentum: float = 0.9
    trust_coefficient: float = 0.001
    lars_eps: float = 1e-8
    base_teacher_momentum: float = 0.99
    final_teacher_momentum: float = 1.0

    # Checkpoints, logging, export
    checkpoint_every: int = 1000  # optimizer steps
    keep_checkpoints: int = 2
    log_every: int = 20
    monitor_every: int = 200  # collapse monitor (teacher feature std and effective rank)
    attention_every: int = 1000  # predictor attention maps as images
    trackers: tuple[str, ...] = ("tensorboard",)
    export_name: str = "resnet50.clove_in1k"  # timm name of the exported backbone
    nonfinite_loss: str = "stop"  # "stop" (error) or "skip" (drop the step) on a non-finite loss, gradient or BN stat
    max_skipped_steps_in_row: int = 20  # stop after this many skipped steps in a row (fp16 overflow or "skip")
    preemption_signals: tuple[str, ...] = ("SIGTERM", "SIGUSR1")  # finish the step, checkpoint and exit on these

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "none") and not self.resume:
            raise ValueError("resume must be 'auto', 'none' or a checkpoint path")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}")
        if self.objective not in ("ranking", "l2"):
            raise ValueError(f"objective must be 'ranking' or 'l2', got {self.objective!r}")
        if self.negatives not in ("intra", "inter", "inter_avg"):
            raise ValueError(f"negatives must be 'intra', 'inter' or 'inter_avg', got {self.negatives!r}")
        if self.nonfinite_loss not in ("stop", "skip"):
            raise ValueError(f"nonfinite_loss must be 'stop' or 'skip', got {self.nonfinite_loss!r}")
        for name in ("epochs", "batch_size", "grad_accum_steps", "checkpoint_every", "keep_checkpoints", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.global_batch_size is not None and self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1 or null, got {self.global_batch_size}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")
        if self.max_image_pixels < 1 or self.max_skipped_steps_in_row < 1:
            raise ValueError(
                f"max_image_pixels and max_skipped_steps_in_row must be >= 1, got {self.max_image_pixels} and "
                f"{self.max_skipped_steps_in_row}"
            )
        unknown = [name for name in self.preemption_signals if name not in signal.Signals.__members__]
        if unknown:
            raise ValueError(f"preemption_signals: unknown signal names {unknown} (e.g. 'SIGTERM', 'SIGUSR1')")

    def to_dict(self) -> dict[str, Any]:
        """Plain-Python form (tuples as lists) for YAML and trackers."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


@dataclass(frozen=True)
class BatchPlan:
    """How the global batch splits over processes and accumulation steps."""

    per_device_batch: int
    grad_accum_steps: int
    num_processes: int

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.grad_accum_steps * self.num_processes


def plan_batches(config: PretrainConfig, num_processes: int) -> BatchPlan:
    """Split the global batch so that it, and with it the learning rate, does not depend on the process count.

    With ``global_batch_size`` set, the per-device batch is the largest value not above ``batch_size`` that divides
    ``global_batch_size / num_processes`` into a whole number of accumulation steps. Without it, the global batch is
    ``batch_size * num_processes * grad_accum_steps``.

    Raises:
        ValueError: if the global batch cannot be split evenly over ``num_processes``.
    """
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    if config.global_batch_size is None:
        return BatchPlan(config.batch_size, config.grad_accum_steps, num_processes)
    if config.global_batch_size % num_processes:
        raise ValueError(
            f"global_batch_size={config.global_batch_size} is not divisible by the {num_processes} processes; "
            "choose a process count that divides it or set global_batch_size=null"
        )
    per_process = config.global_batch_size // num_processes
    accum = math.ceil(per_process / config.batch_size)
    while per_process % accum:
        accum += 1
    return BatchPlan(per_process // accum, accum, num_processes)


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"override {item!r} is not of the form key=value")
    return key.strip(), yaml.safe_load(value) if value != "" else ""


def _coerce(name: str, value: Any, default: Any) -> Any:
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def resolve_recipe_path(recipe: str) -> Path:
    """A recipe name (``demo``, ``clove_r50_in1k_400ep``) or a YAML path."""
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"recipe file {path} does not exist")
        return path
    named = RECIPES_DIR / f"{recipe}.yaml"
    if not named.is_file():
        available = sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"unknown recipe {recipe!r}; available: {', '.join(available)} (or a .yaml path)")
    return named


def load_config(recipe: str | None, overrides: list[str] | tuple[str, ...] = ()) -> PretrainConfig:
    """Build the config from a recipe and ``key=value`` overrides.

    Raises:
        ValueError: on an unknown key (the message names it and the recipe file).
    """
    fields = {f.name: f for f in dataclasses.fields(PretrainConfig)}
    defaults = PretrainConfig()
    values: dict[str, Any] = {}
    sources: list[tuple[str, dict[str, Any]]] = []
    chain: list[Path] = []
    while recipe is not None:
        path = resolve_recipe_path(recipe)
        if path in chain:
            raise ValueError(f"recipe {path} inherits from itself: {' -> '.join(map(str, [*chain, path]))}")
        chain.append(path)
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"recipe {path} must be a mapping of config keys, got {type(loaded).__name__}")
        recipe = loaded.pop("inherit", None)  # a recipe may start from another and change a few keys
        sources.insert(0, (str(path), loaded))
    sources.append(("command line", dict(_parse_override(item) for item in overrides)))
    for origin, mapping in sources:
        for key, value in mapping.items():
            if key not in fields:
                raise ValueError(f"unknown config key {key!r} in {origin}; known keys: {', '.join(sorted(fields))}")
            values[key] = _coerce(key, value, getattr(defaults, key))
    return PretrainConfig(**values)
