"""Tests of the throughput benchmark: a tiny end-to-end run, its JSON line, FLOP counting, inputs and arguments."""

from __future__ import annotations

import json
import math
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.conftest import REPO_ROOT
from training import bench

_TINY = [
    "--device", "cpu", "--backbone", "resnet10t", "--batch-size", "2", "--global-size", "32", "--local-size", "16",
    "--num-local", "2", "--proj-hidden-dim", "32", "--embed-dim", "16", "--num-heads", "2", "--warmup", "1",
    "--repeats", "2", "--data-global-size", "32", "--data-local-size", "16", "--data-images", "3",
    "--data-batch", "2", "--data-samples", "4", "--data-rounds", "1", "--threads", "1",
]  # fmt: skip

_REQUIRED_POSITIVE = (
    "clove_samples_per_s",
    "bare_samples_per_s",
    "step_ratio",
    "flop_ratio",
    "data_samples_per_s_per_worker",
    "data_ratio",
    "clove_gflop_per_sample",
    "bare_gflop_per_sample",
    "clove_peak_memory_bytes",
    "bare_peak_memory_bytes",
    "data_reference_samples_per_s_per_worker",
    "photometric_samples_per_s",
    "photometric_samples_per_s_per_core",
    "data_end_to_end_samples_per_s_per_core",
)


def test_tiny_run_prints_one_json_line_with_positive_finite_figures(capsys):
    returned = bench.main(_TINY)
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert len(lines) > 1  # a readable summary comes first
    assert result["device"] == "cpu"
    for key in _REQUIRED_POSITIVE:
        assert isinstance(result[key], int | float), key
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # The printed ratios are the ratios of the printed rates and FLOPs.
    assert result["data_ratio"] == pytest.approx(
        result["data_samples_per_s_per_worker"] / result["data_reference_samples_per_s_per_worker"]
    )
    assert result["flop_ratio"] == pytest.approx(result["clove_gflop_per_sample"] / result["bare_gflop_per_sample"])
    # Teacher, heads and loss add FLOPs on top of the same backbone work.
    assert result["flop_ratio"] > 1.0
    assert result["mfu"] is None and result["clove_step_host_syncs"] is None  # GPU-only figures
    assert result["config"]["backbone"] == "resnet10t" and result["config"]["batch_size"] == 2
    assert result["clove_samples_per_s"] == pytest.approx(returned["clove_samples_per_s"])


def test_attention_flops_are_counted_on_the_cpu():
    # Two (L x d) @ (d x L)-sized products per head: 2 * (2 * B * h * L * L * d) FLOPs, derived by hand.
    batch, heads, length, dim = 2, 3, 5, 4
    q, k, v = (torch.randn(batch, heads, length, dim) for _ in range(3))
    flops = bench.count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    assert flops == 2 * (2 * batch * heads * length * length * dim)
    linear = torch.nn.Linear(7, 3, bias=False)
    assert bench.count_flops(lambda: linear(torch.randn(5, 7))) == 2 * 5 * 7 * 3


def test_sampled_boxes_are_valid_crops():
    boxes = bench.sample_boxes(50, num_global=2, num_local=3, generator=torch.Generator().manual_seed(0))
    assert boxes.shape == (5, 50, 4)
    assert boxes.min() >= 0.0 and boxes.max() <= 1.0
    assert torch.all(boxes[..., 3] > boxes[..., 1])  # never flipped vertically
    flipped = boxes[..., 0] > boxes[..., 2]
    assert 0.2 < flipped.float().mean() < 0.8  # horizontal flips with p = 0.5
    # Local crops cover at most 30% of the area, global ones at least 20%.
    area = (boxes[..., 2] - boxes[..., 0]).abs() * (boxes[..., 3] - boxes[..., 1])
    assert area[2:].max() < 0.31 and area[:2].min() > 0.19


def test_synthetic_jpegs_have_imagenet_sizes(tmp_path):
    paths = bench.write_synthetic_jpegs(tmp_path, 3, seed=0)
    sizes = []
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            sizes.append(image.size)
    assert sizes == [(500, 375), (375, 500), (500, 333)]
    again = tmp_path / "again"
    again.mkdir()
    assert paths[0].read_bytes() == bench.write_synthetic_jpegs(again, 1, seed=0)[0].read_bytes()  # seeded


def test_device_defaults_and_bad_arguments(capsys):
    args = bench.parse_args([])
    assert (args.backbone, args.global_size, args.local_size, args.mixed_precision) == ("resnet18", 64, 32, "no")
    assert args.channels_last is False and args.output_stride == 16
    args = bench.parse_args(["--backbone", "resnet50", "--batch-size", "4", "--channels-last"])
    assert (args.backbone, args.batch_size, args.channels_last) == ("resnet50", 4, True)
    for bad, message in ((["--batch-size", "0"], "--batch-size"), (["--threads", "0"], "--threads")):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
        assert message in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cuda"])
        assert "cuda" in capsys.readouterr().err


@pytest.mark.skipif(
    shutil.which("git") is None or not (REPO_ROOT / ".git").exists(), reason="needs the git checkout of the project"
)
def test_photometric_baseline_from_a_git_revision(capsys):
    revision = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    result = bench.main([*_TINY, "--skip-step", "--photometric-baseline", revision])
    assert result["photometric_baseline_revision"] == revision
    assert result["photometric_baseline_samples_per_s"] > 0 and result["photometric_speedup_vs_baseline"] > 0
    assert "clove_samples_per_s" not in result
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["photometric_baseline_samples_per_s"] > 0
