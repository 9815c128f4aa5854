"""Throughput of the CLoVE training step next to the bare backbone's, and of the data pipeline, in one process.

    python -m training.bench                  # CPU defaults: small backbone and views, under two minutes on 2 cores
    python -m training.bench --device cuda    # ResNet-50, 2 x 224 + 6 x 96 views, batch 256, bf16, channels-last

What is measured, each after warm-up, as the median of repeated timings (device-synchronised on CUDA), with the
inputs already on the device:

(a) the CLoVE step composed from the library as the recipe composes it: schedules, ``CLoVEModel`` forward (student
    on the global views and on the local views, teacher on the global views), ``CLoVELoss`` over all view pairs,
    backward, ``LARS`` step, ``update_teacher``;
(b) a bare-backbone step on the same views: the same timm backbone, forward on the global views and on the local
    views, a mean as the loss, backward, SGD with momentum (no heads, no teacher);
(c) the data pipeline per CPU worker (one thread, as in a DataLoader worker), from encoded JPEG files to collated
    samples: the split pipeline's worker stage (``ImageFolderSource`` + ``MultiCropGeometry`` via
    ``MultiCropDataset``) next to the reference's all-PIL chain (:mod:`training.reference_views`), on the same
    synthetic ImageNet-sized JPEGs; plus the batched ``MultiCropPhotometric`` stage on the device.

FLOPs of (a) and (b) are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one step of each in the same
configuration (matrix products, convolutions and attention; element-wise ops count zero). The last printed line is
one JSON object with every figure (``step_ratio`` is the time per sample of (a) over (b), ``flop_ratio`` the same
for FLOPs, ``data_ratio`` the worker stage's samples/s over the all-PIL chain's).
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import logging
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import timm
import torch
import torchvision
from PIL import Image, ImageDraw, ImageFilter
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from clove_timm.loss import CLoVELoss
from clove_timm.model import CLoVEModel
from clove_timm.optim import LARS, param_groups_for_lars
from clove_timm.schedules import learning_rate, teacher_momentum
from clove_timm.views import MultiCropGeometry, MultiCropPhotometric, crop_box, sample_crop_params
from training.data import ImageFolderSource, MultiCropDataset
from training.reference_views import ReferenceMultiCrop

_logger = logging.getLogger("training.bench")

METHOD_DOC_GFLOP_PER_SAMPLE = 103.0
"""One CLoVE sample (ResNet-50, 2 x 224 + 6 x 96, student, teacher and heads), method doc section 6."""

# Dense bf16/fp16 tensor-core peak of the cards MFU is computed for without --peak-tflops (vendor datasheets,
# TFLOP/s). Matched in order against torch.cuda.get_device_name().
_PEAK_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),
    ("H200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)

# Defaults per device. CPU: a stride-16 ResNet-18 with the demo recipe's 64 / 32 px views and small heads, which
# finishes in under two minutes on 2 cores. CUDA: the paper's recipe
# (ResNet-50, 224 / 96 px views, batch 256 per GPU, heads 4096 / 256 / 8, bf16).
_DEFAULTS = {
    "cpu": {
        "backbone": "resnet18",
        "output_stride": 16,
        "batch_size": 16,
        "global_size": 64,
        "local_size": 32,
        "proj_hidden_dim": 512,
        "embed_dim": 128,
        "num_heads": 4,
        "mixed_precision": "no",
    },
    "cuda": {
        "backbone": "resnet50",
        "output_stride": None,
        "batch_size": 256,
        "global_size": 224,
        "local_size": 96,
        "proj_hidden_dim": 4096,
        "embed_dim": 256,
        "num_heads": 8,
        "mixed_precision": "bf16",
    },
}
_TIMING_DEFAULTS = {"cpu": {"warmup": 2, "repeats": 5}, "cuda": {"warmup": 10, "repeats": 20}}
# The data pipeline is measured at the recipe's view sizes on every device: its cost does not depend on the model.
_DATA_DEFAULTS = {
    "cpu": {"data_batch": 32, "data_samples": 64, "data_rounds": 3},
    "cuda": {"data_batch": 256, "data_samples": 128, "data_rounds": 3},
}
# ImageNet-like sizes (width, height) of the synthetic JPEGs; 500 x 375 is ImageNet's most common size.
_JPEG_SIZES = ((500, 375), (375, 500), (500, 333), (500, 400), (400, 300), (500, 500))


# --------------------------------------------------------------------------------------------------------------
# Arguments and environment
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m training.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run")
    step = parser.add_argument_group("training step (defaults depend on --device)")
    step.add_argument("--batch-size", type=int, help="images per step (cpu 16, cuda 256)")
    step.add_argument("--backbone", help="timm backbone (cpu resnet18, cuda resnet50)")
    step.add_argument("--output-stride", type=int, help="backbone output stride (cpu 16, cuda the model's own 32)")
    step.add_argument("--global-size", type=int, help="global view side (cpu 64, cuda 224)")
    step.add_argument("--local-size", type=int, help="local view side (cpu 32, cuda 96)")
    step.add_argument("--num-local", type=int, default=6, help="local views per image (6)")
    step.add_argument("--proj-hidden-dim", type=int, help="projector hidden channels (cpu 512, cuda 4096)")
    step.add_argument("--embed-dim", type=int, help="embedding channels (cpu 128, cuda 256)")
    step.add_argument("--num-heads", type=int, help="predictor heads (cpu 4, cuda 8)")
    step.add_argument("--mixed-precision", choices=("bf16", "fp16", "no"), help="autocast dtype (cpu no, cuda bf16)")
    step.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="channels-last model and inputs (default: on for cuda, off for cpu, as the recipe)",
    )
    step.add_argument("--compile", action="store_true", help="torch.compile the CLoVE model and the bare backbone")
    step.add_argument(
        "--cudnn-benchmark",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="let cuDNN pick the fastest convolution algorithms for the fixed shapes (cuda only; default on)",
    )
    step.add_argument("--warmup", type=int, help="untimed steps before timing (cpu 2, cuda 10)")
    step.add_argument("--repeats", type=int, help="timed steps; the median is reported (cpu 5, cuda 20)")
    step.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: known bf16 peaks)")
    step.add_argument("--skip-step", action="store_true", help="measure the data pipeline only")
    data = parser.add_argument_group("data pipeline")
    data.add_argument("--data-global-size", type=int, default=224, help="global view side of the data pipeline (224)")
    data.add_argument("--data-local-size", type=int, default=96, help="local view side of the data pipeline (96)")
    data.add_argument("--data-images", type=int, default=32, help="synthetic JPEG files to write (32)")
    data.add_argument("--data-batch", type=int, help="samples per collated batch (cpu 32, cuda 256)")
    data.add_argument("--data-samples", type=int, help="samples per timed round and pipeline (cpu 64, cuda 128)")
    data.add_argument("--data-rounds", type=int, help="timed rounds; the median is reported (3)")
    data.add_argument("--data-workers", type=int, help="workers for the keep-up ratio (default: CPU count)")
    data.add_argument(
        "--photometric-baseline",
        metavar="REV",
        help="also time MultiCropPhotometric of clove_timm/views.py at this git revision on the same batch",
    )
    data.add_argument("--skip-data", action="store_true", help="measure the training steps only")
    parser.add_argument(
        "--threads", type=int, help="torch threads of the steps and the photometric stage (default: torch's)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs, boxes and views")
    args = parser.parse_args(argv)

    for source in (_DEFAULTS, _TIMING_DEFAULTS, _DATA_DEFAULTS):
        for key, value in source[args.device].items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if args.channels_last is None:
        args.channels_last = args.device == "cuda"
    for name in ("batch_size", "global_size", "local_size", "repeats", "data_images", "data_batch", "data_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or args.num_local < 0 or args.data_rounds < 1:
        parser.error("--warmup and --num-local must be >= 0 and --data-rounds >= 1")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch.cuda.is_available() is False on this machine")
    return args


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    """The machine and library versions the figures come from."""
    env = {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "timm": timm.__version__,
        "pillow": PIL.__version__,
        "load_average_1min": os.getloadavg()[0],
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    return env


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory(device: torch.device) -> int:
    """Peak allocator memory on CUDA since the last reset; on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _median_seconds(fn: Callable[[], Any], *, warmup: int, repeats: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved_seconds(
    first: Callable[[], Any], second: Callable[[], Any], *, repeats: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Times of ``first`` and ``second`` run alternately, so that both see the same machine load."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(repeats):
        for fn, out in zip((first, second), times, strict=True):
            start = time.perf_counter()
            fn()
            _synchronize(device)
            out.append(time.perf_counter() - start)
    return times


# --------------------------------------------------------------------------------------------------------------
# (a) and (b): the training steps
# --------------------------------------------------------------------------------------------------------------

# FlopCounterMode has formulas for the CUDA attention kernels only; the CPU flash kernel costs the same products.
_CPU_ATTENTION_FLOPS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda query, key, value, *args, out_shape=None, **kwargs: sdpa_flop_count(query, key, value)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda grad_out, query, key, value, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(
            grad_out, query, key, value
        )
    ),
}


def count_flops(step: Callable[[], Any]) -> int:
    """FLOPs of one call of ``step`` (matrix products, convolutions, attention), counted, not estimated."""
    counter = FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS)
    with counter:
        step()
    return counter.get_total_flops()


def sample_boxes(
    batch: int,
    *,
    num_global: int,
    num_local: int,
    global_scale: tuple[float, float] = (0.2, 1.0),
    local_scale: tuple[float, float] = (0.08, 0.3),
    image_size: tuple[int, int] = (375, 500),
    generator: torch.Generator,
) -> torch.Tensor:
    """(V, B, 4) crop boxes as the geometry stage draws them for a 500 x 375 image (realistic positive pairs)."""
    height, width = image_size
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    boxes = []
    for view in range(num_global + num_local):
        scale = global_scale if view < num_global else local_scale
        row = []
        for _ in range(batch):
            i, j, h, w = sample_crop_params(height, width, scale=scale, ratio=ratio, generator=generator)
            flipped = bool(torch.rand(1, generator=generator).item() < 0.5)
            row.append(crop_box(i, j, h, w, height=height, width=width, flipped=flipped))
        boxes.append(row)
    return torch.tensor(boxes, dtype=torch.float32)


def _autocast(device: torch.device, mixed_precision: str):
    if mixed_precision == "no":
        return nullcontext()
    dtype = torch.bfloat16 if mixed_precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The two step functions, their inputs and their models, ready to run."""
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    backbone_kwargs = {} if args.output_stride is None else {"output_stride": args.output_stride}
    batch, num_global, num_local = args.batch_size, 2, args.num_local

    global_in = torch.randn(num_global * batch, 3, args.global_size, args.global_size, generator=generator)
    global_in = global_in.to(device).contiguous(memory_format=memory_format)
    local_in = None
    if num_local:
        local_in = torch.randn(num_local * batch, 3, args.local_size, args.local_size, generator=generator)
        local_in = local_in.to(device).contiguous(memory_format=memory_format)
    boxes = sample_boxes(batch, num_global=num_global, num_local=num_local, generator=generator).to(device)
    global_boxes, local_boxes = boxes[:num_global], (boxes[num_global:] if num_local else None)

    model = CLoVEModel(
        args.backbone,
        backbone_kwargs=backbone_kwargs,
        proj_hidden_dim=args.proj_hidden_dim,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
    )
    model = model.to(device, memory_format=memory_format).train()
    criterion = CLoVELoss(embed_dim=args.embed_dim).to(device)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    total_steps = 10_000  # schedule length: lr and momentum take ordinary mid-training values
    peak_lr = 1.0 * batch / 256  # the recipe's linear scaling
    lars = LARS(param_groups_for_lars(trainable, 2e-5), lr=peak_lr, weight_decay=2e-5)

    backbone = timm.create_model(args.backbone, num_classes=0, global_pool="", **backbone_kwargs)
    backbone = backbone.to(device, memory_format=memory_format).train()
    sgd = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)

    # The forward functions the steps call: eager for counting FLOPs, then compiled when asked.
    forwards = {"clove": model, "bare": backbone.forward_features}
    fp16 = args.mixed_precision == "fp16"
    clove_scaler = torch.amp.GradScaler(device.type) if fp16 else None
    bare_scaler = torch.amp.GradScaler(device.type) if fp16 else None
    step_counter = [5_000]

    def clove_step() -> torch.Tensor:
        # schedules, as the recipe reads them at the top of every step
        step = step_counter[0]
        step_counter[0] += 1
        lr = learning_rate(step, base_lr=peak_lr, total_steps=total_steps, warmup_steps=total_steps // 80)
        momentum = teacher_momentum(step, total_steps=total_steps)
        for group in lars.param_groups:
            group["lr"] = lr
        # forward + loss
        with _autocast(device, args.mixed_precision):
            out = forwards["clove"](global_in, local_in)
        loss = criterion(out.student_global, out.student_local, out.teacher_global, global_boxes, local_boxes)
        # backward + optimizer step
        if clove_scaler is not None:
            clove_scaler.scale(loss).backward()
            clove_scaler.step(lars)
            clove_scaler.update()
        else:
            loss.backward()
            lars.step()
        lars.zero_grad(set_to_none=True)
        # teacher EMA
        model.update_teacher(momentum)
        return loss.detach()

    def bare_step() -> torch.Tensor:
        with _autocast(device, args.mixed_precision):
            features = [forwards["bare"](global_in)] + ([forwards["bare"](local_in)] if local_in is not None else [])
        loss = sum(f.float().mean() for f in features)
        if bare_scaler is not None:
            bare_scaler.scale(loss).backward()
            bare_scaler.step(sgd)
            bare_scaler.update()
        else:
            loss.backward()
            sgd.step()
        sgd.zero_grad(set_to_none=True)
        return loss.detach()

    # Counted on the eager modules (the same arithmetic as compiled ones) before any timing.
    flops = {"clove_flops": count_flops(clove_step), "bare_flops": count_flops(bare_step)}
    if args.compile:
        forwards.update({name: torch.compile(forward) for name, forward in forwards.items()})
    return {"clove_step": clove_step, "bare_step": bare_step, "memory_format": memory_format, **flops}


def _count_host_syncs(step: Callable[[], Any]) -> int:
    """Device synchronisations one CUDA step asks for (``torch.cuda.set_sync_debug_mode``)."""
    previous = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode(previous)
    messages = [str(w.message) for w in caught if "synchroniz" in str(w.message)]
    for message in sorted(set(messages)):
        _logger.info("host synchronisation in the CLoVE step: %s", message.splitlines()[0])
    return len(messages)


def _peak_tflops(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops is not None:
        return args.peak_tflops
    if device.type != "cuda" or args.mixed_precision == "no":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in _PEAK_TFLOPS if key in name), None)


def measure_steps(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """(a) and (b): samples/s, time and FLOP ratios, MFU, peak memory."""
    built = build_steps(args, device)
    # Warm-up of each step alone, which also gives its peak memory; then the timed steps, alternating.
    peaks = {}
    for name in ("bare_step", "clove_step"):
        _reset_peak_memory(device)
        for _ in range(args.warmup):
            built[name]()
        _synchronize(device)
        peaks[name] = _peak_memory(device)
    clove_times, bare_times = _interleaved_seconds(
        built["clove_step"], built["bare_step"], repeats=args.repeats, device=device
    )
    syncs = _count_host_syncs(built["clove_step"]) if device.type == "cuda" else None
    clove_seconds, bare_seconds = statistics.median(clove_times), statistics.median(bare_times)
    # Same batch in both: the ratio of step times is the ratio of times per sample. The median of the pairwise
    # ratios is robust to load that drifts during the run.
    step_ratio = statistics.median(a / b for a, b in zip(clove_times, bare_times, strict=True))
    clove_memory, bare_memory = peaks["clove_step"], peaks["bare_step"]

    batch = args.batch_size
    clove_rate, bare_rate = batch / clove_seconds, batch / bare_seconds
    flop_ratio = built["clove_flops"] / built["bare_flops"]
    clove_flops_per_sample = built["clove_flops"] / batch
    peak = _peak_tflops(args, device)
    return {
        "clove_samples_per_s": clove_rate,
        "bare_samples_per_s": bare_rate,
        "clove_step_s": clove_seconds,
        "bare_step_s": bare_seconds,
        "step_ratio": step_ratio,
        "flop_ratio": flop_ratio,
        "step_overhead": step_ratio / flop_ratio,
        "clove_gflop_per_sample": clove_flops_per_sample / 1e9,
        "bare_gflop_per_sample": built["bare_flops"] / batch / 1e9,
        "mfu": None if peak is None else clove_rate * clove_flops_per_sample / (peak * 1e12),
        "peak_tflops": peak,
        "clove_peak_memory_bytes": clove_memory,
        "bare_peak_memory_bytes": bare_memory,
        "clove_step_host_syncs": syncs,
    }


# --------------------------------------------------------------------------------------------------------------
# (c): the data pipeline
# --------------------------------------------------------------------------------------------------------------


def write_synthetic_jpegs(folder: Path, count: int, *, seed: int) -> list[Path]:
    """Write ``count`` photo-like JPEGs of ImageNet sizes (smooth colour fields, shapes, edges, sensor noise).

    Their decode cost is what matters here: JPEG decode time grows with pixel count and entropy, so the images
    have ImageNet's sizes and a mix of smooth regions, sharp edges and fine noise, saved at quality 90.
    """
    rng = np.random.default_rng(seed)
    paths = []
    for index in range(count):
        width, height = _JPEG_SIZES[index % len(_JPEG_SIZES)]
        coarse = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(10, width // 2)), y0 + int(rng.integers(10, height // 2))
            colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=colour)
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        pixels = np.asarray(image).astype(np.int16) + rng.normal(0.0, 6.0, size=(height, width, 3)).astype(np.int16)
        path = folder / f"synthetic_{index:04d}.jpg"
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def _worker_samples_per_s(
    pipelines: dict[str, Callable[[int], Any]], *, batch: int, samples: int, rounds: int
) -> tuple[dict[str, float], list[Any]]:
    """Median samples/s of each ``make_sample`` + ``default_collate``, rounds alternating between pipelines.

    Returns:
        name -> samples/s, and the collated batches of the first pipeline's last round.
    """
    for make_sample in pipelines.values():
        default_collate([make_sample(k) for k in range(min(batch, 4))])  # warm-up: imports, caches, first decode
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    first_name, first_batches = next(iter(pipelines)), []
    for round_index in range(rounds):
        for name, make_sample in pipelines.items():
            batches = []
            start = time.perf_counter()
            for first in range(0, samples, batch):
                keys = range(round_index * samples + first, round_index * samples + min(first + batch, samples))
                batches.append(default_collate([make_sample(k) for k in keys]))
            rates[name].append(samples / (time.perf_counter() - start))
            if name == first_name:
                first_batches = batches
    return {name: statistics.median(values) for name, values in rates.items()}, first_batches


def _load_views_module(revision: str):
    """``clove_timm/views.py`` as it was at a git revision, loaded as a separate module."""
    root = Path(__file__).resolve().parent.parent
    source = subprocess.run(
        ["git", "show", f"{revision}:clove_timm/views.py"], cwd=root, capture_output=True, text=True, check=True
    ).stdout
    name = f"_clove_views_at_{revision.replace('/', '_').replace('~', '_').replace('^', '_')}"
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    exec(compile(source, f"{revision}:clove_timm/views.py", "exec"), module.__dict__)
    return module


def _photometric_samples_per_s(
    variants: dict[str, tuple[torch.nn.Module, int]],
    batch: dict[str, torch.Tensor],
    device: torch.device,
    memory_format: torch.memory_format,
    repeats: int = 3,
) -> dict[str, float]:
    """Samples/s of photometric modules on one collated uint8 batch, the host-to-device copy included.

    Args:
        variants: name -> (module, torch threads to run it with); timed alternately, so all see the same load.
        batch: a collated batch of the worker stage.
        device: where the modules run.
        memory_format: memory format of the outputs (that of the model's inputs).
        repeats: timed runs of each variant; the median is reported.
    """
    tensors = [batch["global_views"], batch["local_views"], batch["photometric_params"]]
    if device.type == "cuda":
        tensors = [t.pin_memory() for t in tensors]
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for run in range(repeats + 1):  # run 0 is the warm-up
            for name, (module, num_threads) in variants.items():
                torch.set_num_threads(num_threads)
                module.to(device)
                start = time.perf_counter()
                global_views, local_views, params = (t.to(device, non_blocking=True) for t in tensors)
                if "memory_format" in inspect.signature(module.forward).parameters:
                    module(global_views, local_views, params, memory_format=memory_format)
                else:  # an older revision: the training loop converts the outputs itself
                    for out in module(global_views, local_views, params):
                        out.contiguous(memory_format=memory_format)
                _synchronize(device)
                if run:
                    times[name].append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return {name: tensors[0].shape[0] / statistics.median(seconds) for name, seconds in times.items()}


def measure_data(args: argparse.Namespace, device: torch.device, memory_format: torch.memory_format) -> dict[str, Any]:
    """(c): worker-stage samples/s of both pipelines on one thread, and the photometric stage on the device."""
    sizes = {"global_size": args.data_global_size, "local_size": args.data_local_size, "num_local": args.num_local}
    rounds = {"batch": args.data_batch, "samples": args.data_samples, "rounds": args.data_rounds}
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="clove_bench_") as folder:
        files = write_synthetic_jpegs(Path(folder), args.data_images, seed=args.seed)
        jpeg_bytes = statistics.mean(f.stat().st_size for f in files)
        dataset = MultiCropDataset(ImageFolderSource(folder), MultiCropGeometry(**sizes), args.seed)
        reference = ReferenceMultiCrop(**sizes)

        def ours(key: int) -> dict[str, torch.Tensor]:
            return dataset[(0, key % len(dataset))]

        def all_pil(key: int) -> dict[str, torch.Tensor]:
            # The reference's ImageFolder loader (torchvision's pil_loader), then its view chain.
            with open(files[key % len(files)], "rb") as handle:
                image = Image.open(handle).convert("RGB")
            return reference(image)

        random.seed(args.seed)
        np.random.seed(args.seed)  # noqa: NPY002 (the reference draws its blur sigma from NumPy's global generator)
        torch.manual_seed(args.seed)
        torch.set_num_threads(1)  # a DataLoader worker runs torch with one thread
        try:
            worker_rates, batches = _worker_samples_per_s({"ours": ours, "all_pil": all_pil}, **rounds)
        finally:
            torch.set_num_threads(threads)
    ours_rate, reference_rate = worker_rates["ours"], worker_rates["all_pil"]

    variants = {
        "subset_rows": (MultiCropPhotometric(subset_rows=True), threads),
        "masks": (MultiCropPhotometric(subset_rows=False), threads),
    }
    if device.type == "cpu":  # on a CPU device the photometric stage also takes CPU time: measure it per core
        variants["per_core"] = (MultiCropPhotometric(), 1)
    if args.photometric_baseline:
        variants["baseline"] = (_load_views_module(args.photometric_baseline).MultiCropPhotometric(), threads)
    rates = _photometric_samples_per_s(variants, batches[0], device, memory_format)
    per_core = rates.get("per_core")
    result = {
        "data_samples_per_s_per_worker": ours_rate,
        "data_reference_samples_per_s_per_worker": reference_rate,
        "data_ratio": ours_rate / reference_rate,
        "data_jpeg_mean_bytes": jpeg_bytes,
        "data_batch": batches[0]["global_views"].shape[0],
        # What MultiCropPhotometric() picks by default on this device: row subsets on the CPU, masks elsewhere.
        "photometric_samples_per_s": rates["subset_rows"] if device.type == "cpu" else rates["masks"],
        "photometric_samples_per_s_subset_rows": rates["subset_rows"],
        "photometric_samples_per_s_masks": rates["masks"],
        "photometric_samples_per_s_per_core": per_core,
    }
    if per_core is not None:
        # Worker stage and photometric stage one after the other on the same core.
        end_to_end = 1.0 / (1.0 / ours_rate + 1.0 / per_core)
        result["data_end_to_end_samples_per_s_per_core"] = end_to_end
        result["data_ratio_end_to_end"] = end_to_end / reference_rate
    if args.photometric_baseline:
        result["photometric_baseline_revision"] = args.photometric_baseline
        result["photometric_baseline_samples_per_s"] = rates["baseline"]
        result["photometric_speedup_vs_baseline"] = result["photometric_samples_per_s"] / rates["baseline"]
    return result


# --------------------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------------------


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(result: dict[str, Any]) -> list[str]:
    lines = [f"device: {result['device']}  ({result['environment'].get('gpu', result['environment']['cpu_model'])})"]
    if "clove_samples_per_s" in result:
        lines += [
            f"(a) CLoVE step:   {result['clove_samples_per_s']:.2f} samples/s  ({result['clove_step_s'] * 1e3:.1f} ms"
            f" per step, {result['clove_gflop_per_sample']:.3g} GFLOP/sample counted)",
            f"(b) bare step:    {result['bare_samples_per_s']:.2f} samples/s  ({result['bare_step_s'] * 1e3:.1f} ms"
            f" per step, {result['bare_gflop_per_sample']:.3g} GFLOP/sample counted)",
            f"    step_ratio (a)/(b) time per sample {result['step_ratio']:.3f}, flop_ratio {result['flop_ratio']:.3f},"
            f" overhead step_ratio/flop_ratio {result['step_overhead']:.3f}",
            f"    peak memory: (a) {result['clove_peak_memory_bytes'] / 2**30:.2f} GiB,"
            f" (b) {result['bare_peak_memory_bytes'] / 2**30:.2f} GiB",
        ]
        if result["mfu"] is not None:
            doc_mfu = result["clove_samples_per_s"] * METHOD_DOC_GFLOP_PER_SAMPLE * 1e9 / (result["peak_tflops"] * 1e12)
            lines.append(
                f"    MFU {result['mfu']:.1%} of {result['peak_tflops']:.0f} TFLOP/s"
                f" ({doc_mfu:.1%} with the method doc's {METHOD_DOC_GFLOP_PER_SAMPLE:.0f} GFLOP/sample)"
            )
        if result["clove_step_host_syncs"] is not None:
            lines.append(f"    host synchronisations in one CLoVE step: {result['clove_step_host_syncs']}")
    if "data_ratio" in result:
        lines += [
            f"(c) data, one worker: ours {result['data_samples_per_s_per_worker']:.1f} samples/s, all-PIL"
            f" reference {result['data_reference_samples_per_s_per_worker']:.1f} samples/s,"
            f" data_ratio {result['data_ratio']:.2f}",
            f"    photometric stage on {result['device']}: {result['photometric_samples_per_s']:.1f} samples/s"
            f" (subset rows {result['photometric_samples_per_s_subset_rows']:.1f},"
            f" masks {result['photometric_samples_per_s_masks']:.1f})",
        ]
        if result.get("photometric_samples_per_s_per_core") is not None:
            lines.append(
                f"    end to end on one core (worker + photometric): "
                f"{result['data_end_to_end_samples_per_s_per_core']:.1f} samples/s,"
                f" ratio {result['data_ratio_end_to_end']:.2f}"
            )
        if result.get("data_keeps_up_ratio") is not None:
            lines.append(
                f"    {result['data_workers']} workers supply {result['data_keeps_up_ratio']:.2f}x the samples/s of (a)"
            )
        if "photometric_baseline_samples_per_s" in result:
            lines.append(
                f"    photometric at {result['photometric_baseline_revision']}:"
                f" {result['photometric_baseline_samples_per_s']:.1f} samples/s,"
                f" now {result['photometric_speedup_vs_baseline']:.2f}x faster"
            )
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; print a summary and, as the last line, the JSON object it returns."""
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = args.cudnn_benchmark
    started = time.perf_counter()
    result: dict[str, Any] = {"device": args.device, "environment": environment(device)}
    result["config"] = {
        key: getattr(args, key)
        for key in (
            "backbone", "output_stride", "batch_size", "global_size", "local_size", "num_local", "proj_hidden_dim",
            "embed_dim", "num_heads", "mixed_precision", "channels_last", "compile", "warmup", "repeats",
            "data_global_size", "data_local_size", "data_images", "data_batch", "data_samples", "data_rounds",
            "threads", "cudnn_benchmark", "seed",
        )
    }  # fmt: skip
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    if not args.skip_step:
        result.update(measure_steps(args, device))
    if not args.skip_data:
        result.update(measure_data(args, device, memory_format))
        same_views = (args.data_global_size, args.data_local_size) == (args.global_size, args.local_size)
        if "clove_samples_per_s" in result and device.type == "cuda" and same_views:
            # On the CPU the step itself uses the cores, so a keep-up ratio would not mean anything there.
            workers = args.data_workers or os.cpu_count() or 1
            result["data_workers"] = workers
            result["data_keeps_up_ratio"] = (
                workers * result["data_samples_per_s_per_worker"] / result["clove_samples_per_s"]
            )
    result["bench_seconds"] = time.perf_counter() - started
    result["environment"]["load_average_1min_at_end"] = os.getloadavg()[0]
    for line in _summary(result):
        print(line)
    print(json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in result.items()}))
    return result


if __name__ == "__main__":
    main()
