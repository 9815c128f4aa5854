"""The split view pipeline (clove_timm.views) against the reference's all-PIL chain (training.reference_views).

Op by op, on fixed images: both pipelines get the same inputs with every other op off, and a per-view statistic
that measures the op's effect is compared between the two samples of views:

* brightness: mean(out) / mean(in), which is the brightness factor;
* contrast: std(luma(out)) / std(luma(in)), the contrast factor;
* saturation: mean chroma(out) / mean chroma(in), the saturation factor;
* hue: the median hue shift of the coloured pixels, in turns;
* colour-jitter probability: the brightness statistic's mass at exactly "no change";
* grayscale: whether all channels are equal;
* blur: the variance added to the horizontal profile of a bright square (sigma ** 2 of the blur, 0 without);
* solarize: whether the view changed;
* geometry: crop area fraction, log aspect ratio, box centre and flip of every view's box.

Two samples agree when their means and standard deviations differ by at most 4 standard errors (plus a small
allowance for the reference's rounding to 8 bits after every PIL op) and their two-sample Kolmogorov-Smirnov
statistic is below its 0.1 % critical value. Every comparison is also run against a deliberately wrong setting of
our pipeline (another range or probability), which must be told apart: the tolerances are tight enough to catch it.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode

from clove_timm.views import MultiCropGeometry, MultiCropPhotometric, to_view_major
from training.reference_views import ReferenceMultiCrop

BATCH = 200  # images; 8 views each
_KS_COEFFICIENT = 1.949  # sqrt(-ln(0.001 / 2) / 2): two-sample Kolmogorov-Smirnov at the 0.1 % level
_ALL_OFF = {
    "brightness": 0.0,
    "contrast": 0.0,
    "saturation": 0.0,
    "hue": 0.0,
    "grayscale_p": 0.0,
    "global_blur_p": (0.0, 0.0),
    "local_blur_p": 0.0,
    "global_solarize_p": (0.0, 0.0),
    "local_solarize_p": 0.0,
}


# ----------------------------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------------------------


def _ks_statistic(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.sort(a), np.sort(b)
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.abs(cdf_a - cdf_b).max())


def _differences(ours, reference, *, allowance: float = 0.0) -> list[str]:
    """What tells the two samples apart (empty when they agree); see the module docstring."""
    ours = np.asarray(ours, dtype=np.float64).ravel()
    reference = np.asarray(reference, dtype=np.float64).ravel()
    n, m = len(ours), len(reference)
    found = []
    mean_error = math.sqrt(ours.var() / n + reference.var() / m)
    if abs(ours.mean() - reference.mean()) > 4.0 * mean_error + allowance:
        found.append(f"means {ours.mean():.4f} vs {reference.mean():.4f} (standard error {mean_error:.4f})")
    std_error = math.sqrt(ours.var() / (2 * n) + reference.var() / (2 * m))
    if abs(ours.std() - reference.std()) > 4.0 * std_error + allowance:
        found.append(f"standard deviations {ours.std():.4f} vs {reference.std():.4f} (standard error {std_error:.4f})")
    statistic, critical = _ks_statistic(ours, reference), _KS_COEFFICIENT * math.sqrt((n + m) / (n * m))
    if statistic > critical:
        found.append(f"Kolmogorov-Smirnov statistic {statistic:.3f} > {critical:.3f}")
    return found


# ----------------------------------------------------------------------------------------------------------------
# Fixed inputs
# ----------------------------------------------------------------------------------------------------------------


def _fixed_image(width: int = 128, height: int = 96) -> Image.Image:
    """Hue sweeping across the width, moderate saturation, values in [0.13, 0.68] with a fine checker texture."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    hue = x / width
    saturation = 0.45 + 0.15 * np.sin(2 * np.pi * y / height)
    value = 0.5 + 0.1 * np.cos(2 * np.pi * (x + y) / 64) + 0.08 * (((x // 2 + y // 2) % 2) * 2 - 1)
    channels = []
    for n in (5, 3, 1):  # HSV -> RGB
        k = (n + 6 * hue) % 6
        channels.append(value - value * saturation * np.clip(np.minimum(k, 4 - k), 0, 1))
    return Image.fromarray(np.clip(np.rint(np.stack(channels, axis=-1) * 255), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def crops() -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2, 3, 24, 24) and (B, 6, 3, 16, 16) uint8 views of the fixed image, from our geometry stage."""
    geometry = MultiCropGeometry(global_size=24, local_size=16)
    generator = torch.Generator().manual_seed(0)
    samples = [geometry(_fixed_image(), generator) for _ in range(BATCH)]
    return torch.stack([s["global_views"] for s in samples]), torch.stack([s["local_views"] for s in samples])


def _bright_square(batch: int, num_views: int, size: int = 24) -> torch.Tensor:
    """(B, V, 3, S, S) uint8: a 6 x 6 white square in the middle of a black view, far enough from the borders."""
    view = torch.zeros(3, size, size, dtype=torch.uint8)
    view[:, size // 2 - 3 : size // 2 + 3, size // 2 - 3 : size // 2 + 3] = 255
    return view.expand(batch, num_views, 3, size, size).contiguous()


def _ours(global_views, local_views, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """Our photometric stage with the given ops on (everything else off), unnormalized, view-major."""
    module = MultiCropPhotometric(**{**_ALL_OFF, **settings}, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    return module(global_views, local_views, generator=torch.Generator().manual_seed(1))


def _reference(global_views, local_views, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's PIL photometric chain on each view, in the same view-major layout."""
    reference = ReferenceMultiCrop(**{**_ALL_OFF, **settings}, normalize=False)
    random.seed(1)
    np.random.seed(1)  # noqa: NPY002 (the reference draws its blur sigma from NumPy's global generator)
    torch.manual_seed(1)
    outputs = []
    for views, blur_p, solarize_p in (
        (global_views, reference.global_blur_p, reference.global_solarize_p),
        (local_views, (reference.local_blur_p,) * local_views.shape[1], (reference.local_solarize_p,) * 6),
    ):
        rows = [
            reference.to_tensor(reference.photometric(Image.fromarray(view.permute(1, 2, 0).numpy()), blur, solar))
            for v, (blur, solar) in enumerate(zip(blur_p, solarize_p, strict=False))
            for view in views[:, v]
        ]  # view-major: view v of every image, then view v + 1
        outputs.append(torch.stack(rows))
    return outputs[0], outputs[1]


def _inputs(views: torch.Tensor) -> torch.Tensor:
    return to_view_major(views).float() / 255.0  # (B, V, 3, S, S) uint8 -> (V*B, 3, S, S) in [0, 1]


# ----------------------------------------------------------------------------------------------------------------
# Per-view statistics: (V*B, 3, S, S) outputs and inputs in [0, 1] -> (V*B,)
# ----------------------------------------------------------------------------------------------------------------


def _luma(x: torch.Tensor) -> torch.Tensor:
    return 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]


def _brightness(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return out.mean(dim=(1, 2, 3)) / inp.mean(dim=(1, 2, 3))


def _contrast(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return _luma(out).std(dim=(1, 2)) / _luma(inp).std(dim=(1, 2))


def _chroma(x: torch.Tensor) -> torch.Tensor:
    return (x.amax(dim=1) - x.amin(dim=1)).mean(dim=(1, 2))


def _saturation(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return _chroma(out) / _chroma(inp)


def _hue_turns(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r, g, b = x.unbind(dim=1)
    value, chroma = x.amax(dim=1), x.amax(dim=1) - x.amin(dim=1)
    safe = chroma.clamp_min(1e-6)
    sector = torch.where(value == r, (g - b) / safe, torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    return torch.remainder(sector / 6.0, 1.0), chroma


def _hue_shift(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    hue_out, _ = _hue_turns(out)
    hue_in, chroma_in = _hue_turns(inp)
    shift = torch.remainder(hue_out - hue_in + 0.5, 1.0) - 0.5  # (M, S, S), wrapped to [-0.5, 0.5)
    coloured = chroma_in > 0.1
    return torch.stack([shift[k][coloured[k]].median() for k in range(shift.shape[0])])


def _is_gray(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return ((out - out[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6).double()


def _changed(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    return ((out - inp).abs().amax(dim=(1, 2, 3)) > 1.5 / 255.0).double()


def _added_variance(out: torch.Tensor, inp: torch.Tensor) -> torch.Tensor:
    """Variance of the horizontal intensity profile, minus the input's: the blur's sigma ** 2 (0 when not blurred)."""

    def profile_variance(x: torch.Tensor) -> torch.Tensor:
        profile = x[:, 0].double().sum(dim=1)  # (M, S): column sums of the red channel
        position = torch.arange(profile.shape[1], dtype=torch.float64)
        total = profile.sum(dim=1)
        centre = (profile * position).sum(dim=1) / total
        return (profile * (position - centre[:, None]) ** 2).sum(dim=1) / total

    return profile_variance(out) - profile_variance(inp)


# ----------------------------------------------------------------------------------------------------------------
# Colour jitter and grayscale
# ----------------------------------------------------------------------------------------------------------------

# (op, settings of both pipelines, statistic, wrong settings of ours that the comparison must catch)
_JITTER_CASES = [
    ("brightness", {"brightness": 0.4}, _brightness, {"brightness": 0.5}),
    ("contrast", {"contrast": 0.4}, _contrast, {"contrast": 0.3}),
    ("saturation", {"saturation": 0.2}, _saturation, {"saturation": 0.3}),
    ("hue", {"hue": 0.1}, _hue_shift, {"hue": 0.13}),
    ("jitter probability", {"brightness": 0.4}, _brightness, {"brightness": 0.4, "jitter_p": 0.6}),
    ("grayscale", {"grayscale_p": 0.2}, _is_gray, {"grayscale_p": 0.3}),
]


@pytest.mark.parametrize(("op", "settings", "statistic", "wrong"), _JITTER_CASES, ids=[c[0] for c in _JITTER_CASES])
def test_colour_ops_match_the_reference(crops, op, settings, statistic, wrong):
    global_views, local_views = crops
    inputs = (_inputs(global_views), _inputs(local_views))

    def measure(outputs):
        return torch.cat([statistic(out, inp) for out, inp in zip(outputs, inputs, strict=True)]).numpy()

    reference = measure(_reference(global_views, local_views, **settings))
    ours = measure(_ours(global_views, local_views, **settings))
    # 8-bit rounding in PIL moves a factor estimate by about 0.5 / 255 over a mean near 0.4, and hue by 1 / 255.
    allowance = 0.005
    assert not _differences(ours, reference, allowance=allowance), (op, _differences(ours, reference))
    wrong_ours = measure(_ours(global_views, local_views, **wrong))
    assert _differences(wrong_ours, reference, allowance=allowance), f"{op}: {wrong} was not told apart"


# ----------------------------------------------------------------------------------------------------------------
# Blur and solarize, per view type
# ----------------------------------------------------------------------------------------------------------------

_VIEW_TYPES = ("global view 1", "global view 2", "local views")


def _per_view_type(outputs: tuple[torch.Tensor, torch.Tensor], inputs, statistic) -> dict[str, np.ndarray]:
    (global_out, local_out), (global_in, local_in) = outputs, inputs
    values = statistic(global_out, global_in).numpy()
    return dict(zip(_VIEW_TYPES, (values[:BATCH], values[BATCH:], statistic(local_out, local_in).numpy()), strict=True))


def test_pil_blur_matches_the_reference_per_view_type():
    """With the reference's own kernel the added variance (sigma ** 2, or 0) matches for every view type."""
    views = (_bright_square(BATCH, 2), _bright_square(BATCH, 6))
    inputs = (_inputs(views[0]), _inputs(views[1]))
    settings = {"global_blur_p": (1.0, 0.1), "local_blur_p": 0.5}
    reference = _per_view_type(_reference(*views, **settings), inputs, _added_variance)
    ours = _per_view_type(_ours(*views, **settings, blur_kernel="pil"), inputs, _added_variance)
    for view_type in _VIEW_TYPES:
        # PIL's 8-bit rounding trims the faint tails of the profile: at most a few hundredths of a pixel squared.
        found = _differences(ours[view_type], reference[view_type], allowance=0.05)
        assert not found, (view_type, found)
    for wrong in ({"local_blur_p": 0.3}, {"global_blur_p": (1.0, 0.3)}, {"blur_sigma": (0.1, 2.5)}):
        wrong_ours = _per_view_type(_ours(*views, **{**settings, **wrong}, blur_kernel="pil"), inputs, _added_variance)
        assert any(_differences(wrong_ours[t], reference[t], allowance=0.05) for t in _VIEW_TYPES), wrong


def test_gaussian_blur_matches_the_reference_from_sigma_0_8():
    """The default sampled Gaussian: the same blur probabilities and the same sigma ** 2 for sigma >= 0.8 ...

    ... but too little spread for small sigmas (the deviation documented in MultiCropPhotometric), so the full
    distributions differ. Blurs adding more than 0.64 px^2 (sigma > 0.8) are compared: how often they occur in each
    view type (probability times the share of the sigma range) and how large they are.
    """
    views = (_bright_square(BATCH, 2), _bright_square(BATCH, 6))
    inputs = (_inputs(views[0]), _inputs(views[1]))
    settings = {"global_blur_p": (1.0, 0.1), "local_blur_p": 0.5}
    reference = _per_view_type(_reference(*views, **settings), inputs, _added_variance)
    ours = _per_view_type(_ours(*views, **settings), inputs, _added_variance)
    threshold = 0.64
    for view_type in _VIEW_TYPES:
        large_ours, large_reference = ours[view_type] > threshold, reference[view_type] > threshold
        assert not _differences(large_ours, large_reference), view_type
        if large_reference.sum() >= 20:
            found = _differences(ours[view_type][large_ours], reference[view_type][large_reference], allowance=0.05)
            assert not found, (view_type, found)
    # The small-sigma deviation itself: the Gaussian leaves clearly fewer views with any visible spread.
    spread_ours, spread_reference = (ours["global view 1"] > 0.005).mean(), (reference["global view 1"] > 0.005).mean()
    assert spread_reference > 0.97 and spread_ours < spread_reference - 0.03


def test_solarize_matches_the_reference_per_view_type():
    # Views whose every pixel is at or above the threshold: a solarized view always changes.
    batch = 3 * BATCH
    generator = torch.Generator().manual_seed(3)
    global_views = torch.randint(128, 256, (batch, 2, 3, 8, 8), dtype=torch.uint8, generator=generator)
    local_views = torch.randint(128, 256, (batch, 6, 3, 8, 8), dtype=torch.uint8, generator=generator)
    inputs = (_inputs(global_views), _inputs(local_views))
    settings = {"global_solarize_p": (0.0, 0.2)}

    def changed(outputs) -> dict[str, np.ndarray]:
        values = torch.cat([_changed(out, inp) for out, inp in zip(outputs, inputs, strict=True)]).numpy()
        return {
            "global view 1": values[:batch],
            "global view 2": values[batch : 2 * batch],
            "local": values[2 * batch :],
        }

    reference = changed(_reference(global_views, local_views, **settings))
    ours = changed(_ours(global_views, local_views, **settings))
    assert reference["global view 1"].max() == 0 and reference["local"].max() == 0
    assert 0.15 < reference["global view 2"].mean() < 0.25
    for view_type in reference:
        assert not _differences(ours[view_type], reference[view_type]), view_type
    for wrong in ({"global_solarize_p": (0.2, 0.0)}, {"global_solarize_p": (0.0, 0.35)}, {"local_solarize_p": 0.1}):
        wrong_ours = changed(_ours(global_views, local_views, **wrong))
        assert any(_differences(wrong_ours[t], reference[t]) for t in reference), wrong


# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------

_IMAGE_SIZE = (500, 375)  # width, height: ImageNet's most common size


def _box_statistics(boxes: torch.Tensor) -> dict[str, np.ndarray]:
    """(K, 4) boxes -> per-box area fraction, log aspect ratio, centre and flip, from the pixel crop they encode."""
    width, height = _IMAGE_SIZE
    boxes = boxes.double()
    crop_w = (boxes[:, 2] - boxes[:, 0]).abs() * (width - 1) + 1
    crop_h = (boxes[:, 3] - boxes[:, 1]) * (height - 1) + 1
    return {
        "area": (crop_w * crop_h / (width * height)).numpy(),
        "log_ratio": torch.log(crop_w / crop_h).numpy(),
        "centre_x": ((boxes[:, 0] + boxes[:, 2]) / 2).numpy(),
        "centre_y": ((boxes[:, 1] + boxes[:, 3]) / 2).numpy(),
        "flipped": (boxes[:, 0] > boxes[:, 2]).double().numpy(),
    }


def _geometry_boxes(samples: int, **settings) -> tuple[torch.Tensor, torch.Tensor]:
    """(samples * G, 4) global and (samples * N, 4) local boxes of our geometry stage (tiny views: boxes only)."""
    geometry = MultiCropGeometry(global_size=4, local_size=4, interpolation="nearest", **settings)
    image = Image.new("RGB", _IMAGE_SIZE)
    generator = torch.Generator().manual_seed(2)
    boxes = torch.stack([geometry(image, generator)["boxes"] for _ in range(samples)])  # (samples, V, 4)
    return boxes[:, :2].reshape(-1, 4), boxes[:, 2:].reshape(-1, 4)


def _reference_boxes(samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    reference = ReferenceMultiCrop(global_size=4, local_size=4, interpolation=InterpolationMode.NEAREST)
    image = Image.new("RGB", _IMAGE_SIZE)
    random.seed(2)
    global_boxes = [reference.crop(image, 4, reference.global_scale)[1] for _ in range(2 * samples)]
    local_boxes = [reference.crop(image, 4, reference.local_scale)[1] for _ in range(6 * samples)]
    return torch.stack(global_boxes), torch.stack(local_boxes)


def test_crop_and_flip_distributions_match_the_reference():
    samples = 600
    reference = [_box_statistics(b) for b in _reference_boxes(samples)]
    ours = [_box_statistics(b) for b in _geometry_boxes(samples)]
    for view_type, ours_stats, reference_stats in zip(("global", "local"), ours, reference, strict=True):
        for name in ours_stats:
            found = _differences(ours_stats[name], reference_stats[name])
            assert not found, (view_type, name, found)
    for wrong in ({"local_scale": (0.05, 0.3)}, {"global_scale": (0.3, 1.0)}, {"ratio": (0.6, 1.6)}, {"flip_p": 0.4}):
        wrong_ours = [_box_statistics(b) for b in _geometry_boxes(samples, **wrong)]
        caught = [
            (view_type, name)
            for view_type, ours_stats, reference_stats in zip(("global", "local"), wrong_ours, reference, strict=True)
            for name in ours_stats
            if _differences(ours_stats[name], reference_stats[name])
        ]
        assert caught, f"{wrong} was not told apart"
