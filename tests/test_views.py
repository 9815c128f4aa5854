"""Tests of the multi-crop views: geometry (crops, boxes, flips, determinism) and the batched photometric stage.

Expected values are derived by hand (boxes against pixels that encode their own coordinates) or computed
independently with torchvision's RandomResizedCrop sampling and ``torchvision.transforms.v2.functional``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from torch.utils.data import default_collate
from torchvision import transforms

from clove_timm.views import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NUM_PHOTOMETRIC_PARAMS,
    MultiCropGeometry,
    MultiCropPhotometric,
    PhotometricParam,
    from_view_major,
    sample_crop_params,
    sample_photometric_params,
    to_rgb,
    to_view_major,
)

# ----------------------------------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------------------------------


def _coordinate_image(width: int, height: int) -> Image.Image:
    """RGB image whose red channel is the column index and green channel the row index (blue 0)."""
    assert width <= 256 and height <= 256
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[..., 0] = np.arange(width, dtype=np.uint8)[None, :]
    pixels[..., 1] = np.arange(height, dtype=np.uint8)[:, None]
    return Image.fromarray(pixels)


def _random_image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _assert_cells_match_source(
    view: torch.Tensor, box: torch.Tensor, grid: int, width: int, height: int, tolerance: float
) -> None:
    """Check the method doc's cell-centre formula against the coordinates stored in the view's pixels.

    Cell (r, c) of a grid x grid map over the view has centre ``(x_ul + (c + 0.5) * bin_w, y_ul + (r + 0.5) *
    bin_h)`` in box coordinates; times (W - 1), (H - 1) that is a source pixel position. In the view the cell
    centre falls between pixels ``m - 1`` and ``m`` with ``m = (c + 0.5) * S / grid``; the mean of the 2 x 2
    pixels there holds the source coordinates that the view shows at that point.
    """
    size = view.shape[-1]
    assert size % (2 * grid) == 0
    x_ul, y_ul, x_lr, y_lr = box.tolist()
    bin_w, bin_h = (x_lr - x_ul) / grid, (y_lr - y_ul) / grid
    for r in range(grid):
        for c in range(grid):
            expected_x = (x_ul + (c + 0.5) * bin_w) * (width - 1)
            expected_y = (y_ul + (r + 0.5) * bin_h) * (height - 1)
            row, col = (r * 2 + 1) * size // (2 * grid), (c * 2 + 1) * size // (2 * grid)
            patch = view[:, row - 1 : row + 1, col - 1 : col + 1].double()
            observed_x, observed_y = patch[0].mean().item(), patch[1].mean().item()
            assert abs(observed_x - expected_x) <= tolerance, (r, c, observed_x, expected_x, box.tolist())
            assert abs(observed_y - expected_y) <= tolerance, (r, c, observed_y, expected_y, box.tolist())


@pytest.mark.parametrize(
    ("width", "height", "interpolation", "tolerance"),
    [
        (256, 200, "nearest", 1.0),  # views mostly downscale the source
        (40, 30, "nearest", 1.0),  # views upscale the source
        (256, 200, "bicubic", 1.5),  # the reference filter; cubic reproduces a linear ramp up to edge effects
    ],
)
def test_boxes_map_cells_to_the_source_pixels_they_show(width, height, interpolation, tolerance):
    image = _coordinate_image(width, height)
    geometry = MultiCropGeometry(global_size=56, local_size=24, num_local=4, interpolation=interpolation)
    flips = 0
    for seed in range(12):
        sample = geometry(image, torch.Generator().manual_seed(seed))
        views = [*sample["global_views"], *sample["local_views"]]
        for view, box, grid in zip(views, sample["boxes"], [7, 7, 3, 3, 3, 3], strict=True):
            _assert_cells_match_source(view, box, grid, width, height, tolerance)
            flips += bool(box[0] > box[2])
    assert 0 < flips < 12 * 6  # both flipped and unflipped views were checked


def test_box_corners_are_the_crop_corner_pixels():
    # Every crop of a 40 x 30 image is smaller than the views, so a NEAREST upscale shows the crop's first and
    # last pixels exactly at the view's corners: box * (side - 1) must give their indices exactly.
    width, height = 40, 30
    image = _coordinate_image(width, height)
    geometry = MultiCropGeometry(global_size=56, local_size=24, interpolation="nearest", flip_p=0.0)
    for seed in range(5):
        sample = geometry(image, torch.Generator().manual_seed(seed))
        for view, box in zip([*sample["global_views"], *sample["local_views"]], sample["boxes"], strict=True):
            x_ul, y_ul, x_lr, y_lr = box.tolist()
            assert round(x_ul * (width - 1), 4) == view[0, 0, 0].item()
            assert round(y_ul * (height - 1), 4) == view[1, 0, 0].item()
            assert round(x_lr * (width - 1), 4) == view[0, -1, -1].item()
            assert round(y_lr * (height - 1), 4) == view[1, -1, -1].item()


@pytest.mark.parametrize(
    ("height", "width"), [(200, 256), (375, 500), (1, 1), (1, 50), (50, 1), (3, 200), (7, 5), (2, 2)]
)
@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.08, 0.3)])
def test_crop_params_follow_torchvision_draw_for_draw(height, width, scale):
    ratio = (3.0 / 4.0, 4.0 / 3.0)
    image = torch.empty(3, height, width)
    for seed in range(20):
        torch.manual_seed(seed)
        expected = transforms.RandomResizedCrop.get_params(image, list(scale), list(ratio))
        got = sample_crop_params(height, width, scale=scale, ratio=ratio, generator=torch.Generator().manual_seed(seed))
        assert got == tuple(expected)


def test_crop_params_fallback_never_returns_an_empty_crop():
    # ratio (2, 3) on a 1 x 1 image: every try fails, torchvision's fallback would give h = round(0.5) = 0.
    for seed in range(5):
        i, j, h, w = sample_crop_params(
            1, 1, scale=(0.2, 1.0), ratio=(2.0, 3.0), generator=torch.Generator().manual_seed(seed)
        )
        assert (i, j, h, w) == (0, 0, 1, 1)


def test_flip_swaps_x_and_mirrors_the_view():
    image = _random_image(120, 90)
    never = MultiCropGeometry(global_size=32, local_size=16, flip_p=0.0)
    always = MultiCropGeometry(global_size=32, local_size=16, flip_p=1.0)
    # The flip draw is taken whatever flip_p is, so both see the same crops.
    plain = never(image, torch.Generator().manual_seed(3))
    flipped = always(image, torch.Generator().manual_seed(3))
    torch.testing.assert_close(flipped["boxes"][:, [2, 1, 0, 3]], plain["boxes"], rtol=0, atol=0)
    assert torch.all(plain["boxes"][:, 0] <= plain["boxes"][:, 2])
    assert torch.all(flipped["boxes"][:, 0] >= flipped["boxes"][:, 2])
    assert torch.equal(flipped["global_views"], plain["global_views"].flip(-1))
    assert torch.equal(flipped["local_views"], plain["local_views"].flip(-1))
    assert torch.equal(flipped["photometric_params"], plain["photometric_params"])


def test_default_shapes_dtypes_and_box_ranges():
    geometry = MultiCropGeometry()
    sample = geometry(_random_image(500, 375), torch.Generator().manual_seed(0))
    assert set(sample) == {"global_views", "local_views", "boxes", "photometric_params"}
    assert sample["global_views"].shape == (2, 3, 224, 224) and sample["global_views"].dtype == torch.uint8
    assert sample["local_views"].shape == (6, 3, 96, 96) and sample["local_views"].dtype == torch.uint8
    assert sample["boxes"].shape == (8, 4) and sample["boxes"].dtype == torch.float32
    assert sample["photometric_params"].shape == (8, NUM_PHOTOMETRIC_PARAMS)
    assert sample["photometric_params"].dtype == torch.float32
    boxes = sample["boxes"]
    assert torch.all((boxes >= 0) & (boxes <= 1))
    assert torch.all(boxes[:, 1] < boxes[:, 3])
    # Local crops cover 8-30 % of the area, global crops 20-100 % (up to rounding of the crop sides).
    areas = (boxes[:, 2] - boxes[:, 0]).abs() * (boxes[:, 3] - boxes[:, 1])
    assert torch.all(areas[:2] > 0.17) and torch.all(areas[2:] < 0.31)


def test_same_seed_same_bytes_different_seed_different_views():
    geometry = MultiCropGeometry(global_size=64, local_size=32)
    image = _random_image(160, 120)
    first = geometry(image, torch.Generator().manual_seed(7))
    second = geometry(image, torch.Generator().manual_seed(7))
    other = geometry(image, torch.Generator().manual_seed(8))
    for key in first:
        assert torch.equal(first[key], second[key]), key
        assert not torch.equal(first[key], other[key]), key


def test_zero_local_views_and_collate():
    geometry = MultiCropGeometry(global_size=32, local_size=16, num_local=0)
    samples = [geometry(_random_image(64, 48, seed), torch.Generator().manual_seed(seed)) for seed in range(3)]
    assert samples[0]["local_views"].shape == (0, 3, 16, 16)
    assert samples[0]["boxes"].shape == (2, 4)
    batch = default_collate(samples)
    assert batch["global_views"].shape == (3, 2, 3, 32, 32)
    assert batch["local_views"].shape == (3, 0, 3, 16, 16)
    global_out, local_out = MultiCropPhotometric()(
        batch["global_views"], batch["local_views"], batch["photometric_params"]
    )
    assert global_out.shape == (6, 3, 32, 32) and local_out.shape == (0, 3, 16, 16)
    assert torch.isfinite(global_out).all()


@pytest.mark.parametrize(("width", "height"), [(1, 1), (1, 9), (9, 1), (2, 1)])
def test_degenerate_images_give_finite_boxes(width, height):
    geometry = MultiCropGeometry(global_size=8, local_size=4)
    sample = geometry(_random_image(width, height), torch.Generator().manual_seed(0))
    boxes = sample["boxes"]
    assert torch.isfinite(boxes).all() and torch.all((boxes >= 0) & (boxes <= 1))
    if width == 1:  # a single column: its one pixel centre is coordinate 0
        assert torch.all(boxes[:, [0, 2]] == 0)
    if height == 1:
        assert torch.all(boxes[:, [1, 3]] == 0)
    assert sample["global_views"].shape == (2, 3, 8, 8) and sample["local_views"].shape == (6, 3, 4, 4)


def test_image_modes_convert_to_rgb():
    gray = Image.fromarray(np.full((4, 5), 77, dtype=np.uint8))
    assert np.asarray(to_rgb(gray))[0, 0].tolist() == [77, 77, 77]
    sixteen = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[0, 32896, 65535]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit_float))[0, :, 0].tolist() == [0, 128, 255]
    # transparency is composited on the ImageNet mean colour: 0.485 * 255, 0.456 * 255, 0.406 * 255, rounded
    background = [124, 116, 104]
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255], [200, 100, 0, 51]]], dtype=np.uint8))
    # alpha 51 = 0.2: 0.2 * colour + 0.8 * background = (0.2 * 200 + 0.8 * 124, 0.2 * 100 + 0.8 * 116, 0.8 * 104)
    assert np.asarray(to_rgb(rgba))[0].tolist() == [background, [10, 20, 30], [139, 113, 83]]
    assert np.asarray(to_rgb(rgba, background=(0, 0, 0)))[0, 0].tolist() == [0, 0, 0]
    palette = Image.new("P", (3, 2))
    palette.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[1, 1].tolist() == [200, 100, 50]
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == background  # palette index 0 is the transparent one
    keyed = Image.new("RGB", (2, 1), (5, 6, 7))  # an RGB colour key (PNG tRNS) marks (5, 6, 7) transparent
    keyed.putpixel((1, 0), (9, 9, 9))
    keyed.info["transparency"] = (5, 6, 7)
    assert np.asarray(to_rgb(keyed))[0].tolist() == [background, [9, 9, 9]]
    cmyk = Image.new("CMYK", (2, 2), (0, 0, 0, 0))
    assert np.asarray(to_rgb(cmyk))[0, 0].tolist() == [255, 255, 255]
    sample = MultiCropGeometry(global_size=8, local_size=4)(sixteen, torch.Generator().manual_seed(0))
    assert sample["global_views"].dtype == torch.uint8
    with pytest.raises(TypeError, match="PIL image"):
        to_rgb(np.zeros((2, 2, 3)))


def test_bad_geometry_settings_are_rejected():
    with pytest.raises(ValueError, match="global_scale"):
        MultiCropGeometry(global_scale=(1.0, 0.2))
    with pytest.raises(ValueError, match="num_local"):
        MultiCropGeometry(num_local=-1)
    with pytest.raises(ValueError, match="interpolation"):
        MultiCropGeometry(interpolation="cubic")
    with pytest.raises(ValueError, match="flip_p"):
        MultiCropGeometry(flip_p=1.5)


def test_view_major_order():
    batch, views = 3, 4
    x = torch.arange(batch * views * 2).view(batch, views, 2)
    flat = to_view_major(x)
    for v in range(views):
        for b in range(batch):
            assert torch.equal(flat[v * batch + b], x[b, v])
    assert torch.equal(from_view_major(flat, views), x)
    with pytest.raises(ValueError, match="views"):
        from_view_major(flat, 5)


# ----------------------------------------------------------------------------------------------------------------
# Photometric
# ----------------------------------------------------------------------------------------------------------------

_NO_NORMALIZE = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}
_ONLY_JITTER = {"grayscale_p": 0.0, "global_blur_p": (0.0, 0.0), "local_blur_p": 0.0, "global_solarize_p": (0.0, 0.0)}


def _random_views(batch: int, num_views: int, size: int, seed: int, low: int = 0, high: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high, (batch, num_views, 3, size, size), generator=generator, dtype=torch.uint8)


def _jitter_params(batch: int, num_views: int, seed: int) -> torch.Tensor:
    params = sample_photometric_params((batch, num_views), generator=torch.Generator().manual_seed(seed))
    params[..., PhotometricParam.JITTER_APPLY] = 0.0  # always jitter
    return params


@pytest.mark.parametrize(
    ("op", "slot", "reference"),
    [
        ("brightness", PhotometricParam.BRIGHTNESS, lambda x, u: TF.adjust_brightness(x, 0.6 + 0.8 * u)),
        ("contrast", PhotometricParam.CONTRAST, lambda x, u: TF.adjust_contrast(x, 0.6 + 0.8 * u)),
        ("saturation", PhotometricParam.SATURATION, lambda x, u: TF.adjust_saturation(x, 0.8 + 0.4 * u)),
        ("hue", PhotometricParam.HUE, lambda x, u: TF.adjust_hue(x, -0.1 + 0.2 * u)),
    ],
)
def test_each_jitter_op_matches_torchvision(op, slot, reference):
    # Only `op` has a non-empty range; the others draw factor 1 (or are off, for hue).
    strengths = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}
    strengths[op] = {"brightness": 0.4, "contrast": 0.4, "saturation": 0.2, "hue": 0.1}[op]
    module = MultiCropPhotometric(**strengths, **_ONLY_JITTER, **_NO_NORMALIZE)
    views = _random_views(4, 2, 12, seed=1)
    params = _jitter_params(4, 2, seed=2)
    out, _ = module(views, _random_views(4, 0, 6, seed=0), params)
    for v in range(2):
        for b in range(4):
            expected = reference(views[b, v].float() / 255.0, params[b, v, slot].item())
            torch.testing.assert_close(out[v * 4 + b], expected, rtol=0, atol=1e-5)


def test_jitter_off_leaves_views_unchanged():
    module = MultiCropPhotometric(**_ONLY_JITTER, **_NO_NORMALIZE)
    views = _random_views(3, 2, 10, seed=3)
    params = sample_photometric_params((3, 2), generator=torch.Generator().manual_seed(0))
    params[..., PhotometricParam.JITTER_APPLY] = 0.9  # above jitter_p = 0.8: no jitter
    out, _ = module(views, _random_views(3, 0, 6, seed=0), params)
    assert torch.equal(out, to_view_major(views).float() / 255.0)


def test_grayscale_solarize_and_normalize_match_torchvision():
    views = _random_views(3, 2, 10, seed=4)
    locals_ = _random_views(3, 0, 6, seed=0)
    params = sample_photometric_params((3, 2), generator=torch.Generator().manual_seed(0))
    x = to_view_major(views).float() / 255.0  # (G*B, 3, S, S)

    gray = MultiCropPhotometric(jitter_p=0.0, grayscale_p=1.0, global_blur_p=(0.0, 0.0), global_solarize_p=(0.0, 0.0))
    out, _ = gray(views, locals_, params)
    expected = TF.normalize(TF.rgb_to_grayscale(x, num_output_channels=3), IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)

    solarize = MultiCropPhotometric(
        jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), global_solarize_p=(1.0, 1.0), **_NO_NORMALIZE
    )
    out, _ = solarize(views, locals_, params)
    torch.testing.assert_close(out, TF.solarize(x, 128.0 / 255.0), rtol=0, atol=1e-6)
    # uint8 128 inverts and 127 does not, as PIL's ImageOps.solarize(threshold=128) in the reference.
    edge = torch.tensor([127, 128], dtype=torch.uint8).view(1, 1, 1, 1, 2).expand(1, 2, 3, 2, 2).contiguous()
    out, _ = solarize(edge, _random_views(1, 0, 2, seed=0), params[:1])
    assert torch.allclose(out[:, :, :, 0], torch.tensor(127 / 255)) and torch.allclose(
        out[:, :, :, 1], torch.tensor(127 / 255)
    )

    plain = MultiCropPhotometric(jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), global_solarize_p=(0.0, 0.0))
    out, _ = plain(views, locals_, params)
    torch.testing.assert_close(out, TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-6)


def _blur_reference(x: torch.Tensor, sigma: float, radius: int) -> torch.Tensor:
    # torchvision's Gaussian blur on an edge-replicated image; the crop drops torchvision's own reflect padding.
    padded = F.pad(x.unsqueeze(0), (radius,) * 4, mode="replicate").squeeze(0)
    blurred = TF.gaussian_blur(padded, [2 * radius + 1] * 2, [sigma, sigma])
    return blurred[:, radius:-radius, radius:-radius]


def test_blur_matches_a_replicate_padded_gaussian():
    module = MultiCropPhotometric(
        jitter_p=0.0, grayscale_p=0.0, global_blur_p=(1.0, 1.0), global_solarize_p=(0.0, 0.0), **_NO_NORMALIZE
    )
    views = _random_views(3, 2, 16, seed=5)
    params = sample_photometric_params((3, 2), generator=torch.Generator().manual_seed(1))
    out, _ = module(views, _random_views(3, 0, 6, seed=0), params)
    assert module.blur_radius == math.ceil(3 * 2.0)
    for v in range(2):
        for b in range(3):
            sigma = 0.1 + 1.9 * params[b, v, PhotometricParam.BLUR_SIGMA].item()
            expected = _blur_reference(views[b, v].float() / 255.0, sigma, module.blur_radius)
            torch.testing.assert_close(out[v * 3 + b], expected, rtol=0, atol=1e-5)


def test_full_pipeline_matches_torchvision_composition():
    """Default settings, every op drawn per view; the expected views compose torchvision ops in the drawn order."""
    batch, size_g, size_l = 6, 16, 8
    module = MultiCropPhotometric()
    global_views, local_views = _random_views(batch, 2, size_g, seed=6), _random_views(batch, 3, size_l, seed=7)
    params = sample_photometric_params((batch, 5), generator=torch.Generator().manual_seed(11))
    global_out, local_out = module(global_views, local_views, params)
    assert global_out.shape == (2 * batch, 3, size_g, size_g) and local_out.shape == (3 * batch, 3, size_l, size_l)
    blur_p, solarize_p = [1.0, 0.1, 0.5, 0.5, 0.5], [0.0, 0.2, 0.0, 0.0, 0.0]
    jitter_ops = [
        lambda x, u: TF.adjust_brightness(x, 0.6 + 0.8 * u[PhotometricParam.BRIGHTNESS]),
        lambda x, u: TF.adjust_contrast(x, 0.6 + 0.8 * u[PhotometricParam.CONTRAST]),
        lambda x, u: TF.adjust_saturation(x, 0.8 + 0.4 * u[PhotometricParam.SATURATION]),
        lambda x, u: TF.adjust_hue(x, -0.1 + 0.2 * u[PhotometricParam.HUE]),
    ]
    order_slots = [
        PhotometricParam.ORDER_BRIGHTNESS,
        PhotometricParam.ORDER_CONTRAST,
        PhotometricParam.ORDER_SATURATION,
        PhotometricParam.ORDER_HUE,
    ]
    for v in range(5):
        views, out, row = (global_views, global_out, v) if v < 2 else (local_views, local_out, v - 2)
        for b in range(batch):
            u = params[b, v].tolist()
            x = views[b, row].float() / 255.0
            if u[PhotometricParam.JITTER_APPLY] < 0.8:
                for op in sorted(range(4), key=lambda k: u[order_slots[k]]):
                    x = jitter_ops[op](x, u)
            if u[PhotometricParam.GRAYSCALE_APPLY] < 0.2:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if u[PhotometricParam.BLUR_APPLY] < blur_p[v]:
                x = _blur_reference(x, 0.1 + 1.9 * u[PhotometricParam.BLUR_SIGMA], 6)
            if u[PhotometricParam.SOLARIZE_APPLY] < solarize_p[v]:
                x = TF.solarize(x, 128.0 / 255.0)
            expected = TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)
            torch.testing.assert_close(out[row * batch + b], expected, rtol=0, atol=3e-5)


@pytest.mark.parametrize("subset_rows", [True, False])
def test_large_views_match_torchvision_composition(subset_rows):
    """Views of 100 px take the view-by-view blur on the CPU subset path; both paths must still compose torchvision."""
    batch, size = 3, 100
    module = MultiCropPhotometric(subset_rows=subset_rows, **_NO_NORMALIZE)
    global_views = _random_views(batch, 2, size, seed=12)
    params = sample_photometric_params((batch, 2), generator=torch.Generator().manual_seed(13))
    params[:, 0, PhotometricParam.BLUR_SIGMA] = torch.tensor([0.0, 0.3, 1.0])  # sigma 0.1 (1-tap reach) to 2.0
    out, _ = module(global_views, _random_views(batch, 0, 8, seed=0), params)
    order_slots = [
        PhotometricParam.ORDER_BRIGHTNESS,
        PhotometricParam.ORDER_CONTRAST,
        PhotometricParam.ORDER_SATURATION,
        PhotometricParam.ORDER_HUE,
    ]
    jitter_ops = [
        lambda x, u: TF.adjust_brightness(x, 0.6 + 0.8 * u[PhotometricParam.BRIGHTNESS]),
        lambda x, u: TF.adjust_contrast(x, 0.6 + 0.8 * u[PhotometricParam.CONTRAST]),
        lambda x, u: TF.adjust_saturation(x, 0.8 + 0.4 * u[PhotometricParam.SATURATION]),
        lambda x, u: TF.adjust_hue(x, -0.1 + 0.2 * u[PhotometricParam.HUE]),
    ]
    for v, blur_p, solarize_p in ((0, 1.0, 0.0), (1, 0.1, 0.2)):
        for b in range(batch):
            u = params[b, v].tolist()
            x = global_views[b, v].float() / 255.0
            if u[PhotometricParam.JITTER_APPLY] < 0.8:
                for op in sorted(range(4), key=lambda k: u[order_slots[k]]):
                    x = jitter_ops[op](x, u)
            if u[PhotometricParam.GRAYSCALE_APPLY] < 0.2:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if u[PhotometricParam.BLUR_APPLY] < blur_p:
                x = _blur_reference(x, 0.1 + 1.9 * u[PhotometricParam.BLUR_SIGMA], 6)
            if u[PhotometricParam.SOLARIZE_APPLY] < solarize_p:
                x = TF.solarize(x, 128.0 / 255.0)
            torch.testing.assert_close(out[v * batch + b], x, rtol=0, atol=3e-5)


@pytest.mark.parametrize(("size", "subset_rows"), [(20, True), (20, False), (100, True)])
def test_pil_blur_kernel_matches_pillow(size, subset_rows):
    """``blur_kernel="pil"`` against PIL's own GaussianBlur: equal up to PIL's rounding to 8 bits after each of its
    six passes (at most 3 grey levels), also at the borders. Size 100 takes the view-by-view CPU blur."""
    from PIL import ImageFilter

    module = MultiCropPhotometric(
        jitter_p=0.0,
        grayscale_p=0.0,
        global_blur_p=(1.0, 1.0),
        global_solarize_p=(0.0, 0.0),
        blur_kernel="pil",
        subset_rows=subset_rows,
        **_NO_NORMALIZE,
    )
    views = _random_views(2, 2, size, seed=20)
    params = sample_photometric_params((2, 2), generator=torch.Generator().manual_seed(21))
    params[..., PhotometricParam.BLUR_SIGMA] = torch.tensor([[0.0, 0.2], [0.5, 1.0]])  # sigma 0.1, 0.48, 1.05, 2.0
    out, _ = module(views, _random_views(2, 0, 8, seed=0), params)
    for v in range(2):
        for b in range(2):
            sigma = 0.1 + 1.9 * params[b, v, PhotometricParam.BLUR_SIGMA].item()
            image = Image.fromarray(views[b, v].permute(1, 2, 0).numpy())
            expected = torch.from_numpy(np.asarray(image.filter(ImageFilter.GaussianBlur(sigma))).copy())
            difference = (out[v * 2 + b] * 255.0 - expected.permute(2, 0, 1).float()).abs()
            assert difference.max() <= 3.0 and difference.mean() < 1.5


def test_subset_and_mask_paths_agree_and_leave_inputs_alone():
    batch = 40
    global_views, local_views = _random_views(batch, 2, 12, seed=14), _random_views(batch, 4, 6, seed=15)
    params = sample_photometric_params((batch, 6), generator=torch.Generator().manual_seed(16))
    subset_out = MultiCropPhotometric(subset_rows=True)(global_views, local_views, params)
    mask_out = MultiCropPhotometric(subset_rows=False)(global_views, local_views, params)
    for a, b in zip(subset_out, mask_out, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # Float inputs are converted into a fresh buffer: the in-place ops never reach the caller's tensor.
    float_views = global_views.float() / 255.0
    kept = float_views.clone()
    for subset_rows in (True, False):
        MultiCropPhotometric(subset_rows=subset_rows)(float_views[:, :2], local_views[:, :0], params[:, :2])
        MultiCropPhotometric(subset_rows=subset_rows)(float_views[:1, :2], local_views[:1, :0], params[:1, :2])
    assert torch.equal(float_views, kept)


@pytest.mark.parametrize("subset_rows", [True, False])
def test_output_dtype_and_memory_format(subset_rows):
    module = MultiCropPhotometric(subset_rows=subset_rows)
    global_views, local_views = _random_views(4, 2, 10, seed=17), _random_views(4, 3, 6, seed=18)
    params = sample_photometric_params((4, 5), generator=torch.Generator().manual_seed(19))
    plain = module(global_views, local_views, params)
    channels_last = module(global_views, local_views, params, memory_format=torch.channels_last)
    half = module(global_views, local_views, params, dtype=torch.bfloat16, memory_format=torch.channels_last)
    for reference, out, low in zip(plain, channels_last, half, strict=True):
        assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
        assert torch.equal(out, reference)
        assert low.dtype == torch.bfloat16 and low.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(low, reference.to(torch.bfloat16))


def _fractions(flags: torch.Tensor, batch: int, num_views: int) -> list[float]:
    # (V*B,) bool, view-major -> fraction of True per view.
    return flags.view(num_views, batch).float().mean(dim=1).tolist()


def _changed(out: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    # (V*B, 3, S, S) unnormalized output vs (B, V, 3, S, S) uint8 input -> (V*B,) bool.
    return (out - to_view_major(views).float() / 255.0).abs().amax(dim=(1, 2, 3)) > 1e-3


def _is_gray(out: torch.Tensor) -> torch.Tensor:
    # (V*B, 3, S, S) unnormalized output -> (V*B,) bool: all three channels equal.
    return (out - out[:, :1]).abs().amax(dim=(1, 2, 3)) < 1e-6


def test_probabilities_per_view_type():
    batch, size = 2000, 6
    global_views, local_views = _random_views(batch, 2, size, seed=8), _random_views(batch, 1, size, seed=9)
    generator = torch.Generator().manual_seed(0)

    def run(views: tuple[torch.Tensor, torch.Tensor], **settings) -> tuple[torch.Tensor, torch.Tensor]:
        module = MultiCropPhotometric(**settings, **_NO_NORMALIZE)
        return module(*views, generator=generator)

    # Grayscale, default settings otherwise: jitter never makes the channels equal; blur and solarize keep them so.
    global_out, local_out = run((global_views, local_views))
    for fraction in _fractions(_is_gray(global_out), batch, 2) + _fractions(_is_gray(local_out), batch, 1):
        assert fraction == pytest.approx(0.2, abs=0.04)

    # Blur only, with a fixed sigma large enough to change every view it touches.
    settings = {"jitter_p": 0.0, "grayscale_p": 0.0, "blur_sigma": (2.0, 2.0), "global_solarize_p": (0.0, 0.0)}
    global_out, local_out = run((global_views, local_views), **settings)
    assert _fractions(_changed(global_out, global_views), batch, 2) == [1.0, pytest.approx(0.1, abs=0.03)]
    assert _fractions(_changed(local_out, local_views), batch, 1) == [pytest.approx(0.5, abs=0.05)]

    # Solarize only, on views whose every pixel (200) is above the threshold: global view 2 only.
    bright = (torch.full_like(global_views, 200), torch.full_like(local_views, 200))
    global_out, local_out = run(bright, jitter_p=0.0, grayscale_p=0.0, global_blur_p=(0.0, 0.0), local_blur_p=0.0)
    assert _fractions(_changed(global_out, bright[0]), batch, 2) == [0.0, pytest.approx(0.2, abs=0.04)]
    assert _fractions(_changed(local_out, bright[1]), batch, 1) == [0.0]
    plain, inverted = torch.tensor(200 / 255), torch.tensor(55 / 255)
    assert torch.all(torch.isclose(global_out, plain, atol=1e-6) | torch.isclose(global_out, inverted, atol=1e-6))

    # Colour jitter only.
    global_out, local_out = run((global_views, local_views), **_ONLY_JITTER)
    for fraction in _fractions(_changed(global_out, global_views), batch, 2):
        assert fraction == pytest.approx(0.8, abs=0.04)


def test_generator_determinism_device_and_dtype():
    module = MultiCropPhotometric()
    global_views, local_views = _random_views(2, 2, 8, seed=10), _random_views(2, 2, 4, seed=11)
    first = module(global_views, local_views, generator=torch.Generator().manual_seed(5))
    second = module(global_views, local_views, generator=torch.Generator().manual_seed(5))
    other = module(global_views, local_views, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[0], other[0])
    assert first[0].device == global_views.device and first[0].dtype == torch.float32
    half = module(global_views, local_views, generator=torch.Generator().manual_seed(5), dtype=torch.bfloat16)
    assert half[0].dtype == torch.bfloat16 and half[1].dtype == torch.bfloat16
    torch.testing.assert_close(half[0].float(), first[0], rtol=1e-2, atol=2e-2)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = module(global_views, local_views, generator=torch.Generator().manual_seed(5))
    assert torch.equal(under_autocast[0], first[0])


def test_photometric_rejects_bad_inputs():
    module = MultiCropPhotometric()
    views, local_views = _random_views(2, 2, 8, seed=0), _random_views(2, 1, 4, seed=0)
    with pytest.raises(ValueError, match="3 global views"):
        module(_random_views(2, 3, 8, seed=0), local_views)
    with pytest.raises(ValueError, match="photometric_params"):
        module(views, local_views, torch.rand(2, 2, NUM_PHOTOMETRIC_PARAMS))
    with pytest.raises(ValueError, match="batch size"):
        module(views, _random_views(3, 1, 4, seed=0))
    with pytest.raises(ValueError, match="local_views"):
        module(views, local_views[:, :, :, :2])
    with pytest.raises(ValueError, match="global_solarize_p"):
        MultiCropPhotometric(global_blur_p=(1.0, 0.1, 0.5))
