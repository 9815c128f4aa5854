"""Multi-crop views for CLoVE: a CPU geometry stage and a batched, device-agnostic photometric stage.

CLoVE trains on 2 global views (224 px) and 6 local views (96 px) of every image, each view carrying its crop
box in original-image coordinates (method doc section 3). The reference (``contrast/data/transform.py`` and
``contrast/data/transform_coord.py``) runs the whole chain in PIL per view, about 33.5 samples/s per CPU core
(method doc section 6). Here the chain is split in two:

* :class:`MultiCropGeometry` runs in the DataLoader workers. It samples every crop with torchvision's
  RandomResizedCrop algorithm, crops and resizes each view in one PIL call, flips, and returns uint8 tensors with
  the boxes. It also draws every random number the photometric stage needs, from the same generator, so one
  ``torch.Generator`` per sample fixes the sample completely (a resumed run sees identical views).
* :class:`MultiCropPhotometric` runs on the training device on whole batches: colour jitter in a random order per
  view, grayscale, Gaussian blur, solarize and normalization, with per-view random parameters and no Python loop
  over samples. Its outputs are in view-major order (row ``v * B + b``), the order in which the reference
  concatenates views for the backbone.

Photometric parameters travel as raw ``U(0, 1)`` draws, one row of :data:`NUM_PHOTOMETRIC_PARAMS` per view (slots
in :class:`PhotometricParam`); the photometric stage maps them to probabilities and ranges from its own settings,
so the geometry stage needs no photometric setting at all.

Symbols used in this module:
    B: batch size.
    G: number of global views per image; N: number of local views per image (N >= 0); V = G + N.
    Sg / Sl: side of a global / local view in pixels.
    H, W: height and width of the original image (or of a view, where said).
    P: number of photometric parameters per view (:data:`NUM_PHOTOMETRIC_PARAMS`).
    M: number of views in a flattened batch (V * B, or G * B / N * B).
"""

from __future__ import annotations

import enum
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_PHOTOMETRIC_PARAMS",
    "MultiCropGeometry",
    "MultiCropPhotometric",
    "PhotometricParam",
    "crop_box",
    "from_view_major",
    "sample_crop_params",
    "sample_photometric_params",
    "to_rgb",
    "to_view_major",
]

_logger = logging.getLogger(__name__)

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""ImageNet channel means, the reference ``transforms.Normalize`` (``contrast/data/transform.py``)."""
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""ImageNet channel standard deviations, the reference ``transforms.Normalize``."""

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
}

# Luma weights of torchvision's tensor grayscale (ITU-R 601-2, as rounded by torchvision). PIL's ``convert("L")``,
# which the reference's PIL pipeline uses, has 0.299 for red; the two differ by at most 1e-4 of the pixel range.
_LUMA_WEIGHTS = (0.2989, 0.587, 0.114)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# --------------------------------------------------------------------------------------------------------------
# Photometric parameter layout
# --------------------------------------------------------------------------------------------------------------


class PhotometricParam(enum.IntEnum):
    """Slots of a view's photometric parameter row; every slot holds one ``U(0, 1)`` draw.

    The photometric stage turns each draw into a decision or a value with its own settings: an ``*_APPLY`` slot
    applies its op when the draw is below the op's probability; a value slot ``u`` maps to ``lo + (hi - lo) * u``
    of the op's range; the four ``ORDER_*`` slots are sort keys, and sorting them gives the order of the four
    colour-jitter ops (a uniformly random permutation, as torchvision's ``ColorJitter`` draws with ``randperm``).
    """

    JITTER_APPLY = 0
    BRIGHTNESS = 1
    CONTRAST = 2
    SATURATION = 3
    HUE = 4
    ORDER_BRIGHTNESS = 5
    ORDER_CONTRAST = 6
    ORDER_SATURATION = 7
    ORDER_HUE = 8
    GRAYSCALE_APPLY = 9
    BLUR_APPLY = 10
    BLUR_SIGMA = 11
    SOLARIZE_APPLY = 12


NUM_PHOTOMETRIC_PARAMS: int = len(PhotometricParam)
"""P, the number of photometric parameters drawn per view."""

# Colour-jitter op ids; an op's id is its position among the ORDER_* slots.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = 0, 1, 2, 3
_ORDER_SLOTS = slice(PhotometricParam.ORDER_BRIGHTNESS, PhotometricParam.ORDER_HUE + 1)


def sample_photometric_params(
    shape: Sequence[int],
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Draw raw photometric parameters for a set of views.

    Args:
        shape: leading shape, e.g. ``(V,)`` for one image or ``(B, V)`` for a batch.
        generator: random number generator; ``None`` uses torch's global generator.
        device: device of the result; defaults to the generator's device (CPU for the global generator).

    Returns:
        (*shape, P) float32 ``U(0, 1)`` draws, slots as in :class:`PhotometricParam`.
    """
    draw_device = generator.device if generator is not None else None
    params = torch.rand((*shape, NUM_PHOTOMETRIC_PARAMS), generator=generator, device=draw_device)
    return params if device is None else params.to(device)


# --------------------------------------------------------------------------------------------------------------
# Geometry (CPU, per image)
# --------------------------------------------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Pillow's ``convert("RGB")`` clips 16-bit and 32-bit integer and float images to [0, 255], which turns most of
    a 16-bit image white and a [0, 1] float image black; those modes are rescaled here instead:

    * ``I;16*``: divided by 257 (65535 -> 255).
    * ``I``: divided by 257 when the maximum exceeds 255 (a 16-bit image stored as 32-bit), else used as is;
      negative values clip to 0.
    * ``F``: multiplied by 255 when the maximum is at most 1 (a [0, 1] image), else clipped to [0, 255].

    A palette image with transparency goes through RGBA. Alpha is dropped without compositing, as the reference's
    ``ImageFolder`` loader (``img.convert("RGB")``) does.

    Args:
        image: PIL image of any mode.

    Returns:
        The image in mode ``RGB`` (the same object when it already is).

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: Pillow cannot convert the mode to RGB.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        peak = float(values.max()) if values.size else 0.0
        if mode in _SIXTEEN_BIT_MODES or (mode == "I" and peak > 255.0):
            values = values / 257.0
        elif mode == "F" and peak <= 1.0:
            values = values * 255.0
        _logger.debug("rescaled a PIL image of mode %s (maximum %s) to 8 bits", mode, peak)
        gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ValueError(f"cannot convert a PIL image of mode {mode!r} to RGB: {error}") from error


def sample_crop_params(
    height: int,
    width: int,
    *,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
) -> tuple[int, int, int, int]:
    """Sample a RandomResizedCrop window with torchvision's algorithm, from ``generator``.

    Follows ``torchvision.transforms.RandomResizedCrop.get_params`` draw for draw: up to 10 tries of an area
    fraction ``U(scale)`` and a log aspect ratio ``U(log ratio)`` (float32, as torchvision draws them); the first
    window that fits is placed uniformly at random; otherwise the central crop clipped to ``ratio``. With the same
    seed in ``generator`` as in torch's global generator, the result equals torchvision's.

    Deviation: the fallback window is clamped to at least 1 x 1 pixel. torchvision can return a 0-pixel side
    there (e.g. ``round(1 / 2) = 0`` for a 1 px image with ``ratio=(2, 3)``); with ``ratio`` around 1 (the
    default) the two never differ.

    Args:
        height: image height H (>= 1).
        width: image width W (>= 1).
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio w / h.
        generator: random number generator; ``None`` uses torch's global generator.

    Returns:
        ``(i, j, h, w)``: top row, left column, height and width of the crop, ``1 <= h <= H``, ``1 <= w <= W``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image must be at least 1 x 1 pixel, got {height} x {width}")
    area = height * width
    log_ratio = torch.log(torch.tensor(ratio, dtype=torch.float32))
    for _ in range(10):
        target_area = area * torch.empty(1).uniform_(scale[0], scale[1], generator=generator).item()
        log_aspect = torch.empty(1).uniform_(log_ratio[0].item(), log_ratio[1].item(), generator=generator)
        aspect = torch.exp(log_aspect).item()
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            i = int(torch.randint(0, height - h + 1, size=(1,), generator=generator).item())
            j = int(torch.randint(0, width - w + 1, size=(1,), generator=generator).item())
            return i, j, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = round(w / min(ratio))
    elif in_ratio > max(ratio):
        h = height
        w = round(h * max(ratio))
    else:
        w, h = width, height
    h = min(max(h, 1), height)
    w = min(max(w, 1), width)
    return (height - h) // 2, (width - w) // 2, h, w


def crop_box(
    i: int, j: int, h: int, w: int, *, height: int, width: int, flipped: bool = False
) -> tuple[float, float, float, float]:
    """Box of a crop in original-image coordinates (method doc section 3, reference ``transform_coord.py``).

    ``(x_ul, y_ul, x_lr, y_lr) = (j / (W - 1), i / (H - 1), (j + w - 1) / (W - 1), (i + h - 1) / (H - 1))``:
    pixel centre ``k`` of an axis maps to ``k / (side - 1)``, so the box runs from the centre of the crop's first
    pixel to the centre of its last one. A horizontal flip swaps ``x_ul`` and ``x_lr``.

    Deviation: the reference divides by zero on an image 1 pixel wide or high. Here such an axis has a single
    pixel centre, which is taken as coordinate 0.0: both box coordinates of that axis are 0.0 (a zero-size
    extent, so every cell of every view has that coordinate and matching uses the other axis only).

    Args:
        i: top row of the crop.
        j: left column of the crop.
        h: crop height in pixels.
        w: crop width in pixels.
        height: image height H.
        width: image width W.
        flipped: whether the view was flipped horizontally.

    Returns:
        ``(x_ul, y_ul, x_lr, y_lr)`` in [0, 1].
    """
    x_scale = 1.0 / (width - 1) if width > 1 else 0.0
    y_scale = 1.0 / (height - 1) if height > 1 else 0.0
    x_ul, x_lr = j * x_scale, (j + w - 1) * x_scale
    if flipped:
        x_ul, x_lr = x_lr, x_ul
    return x_ul, i * y_scale, x_lr, (i + h - 1) * y_scale


def _check_range(value: tuple[float, float], name: str, *, positive: bool = False) -> tuple[float, float]:
    if len(value) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {value!r}")
    lo, hi = float(value[0]), float(value[1])
    if not lo <= hi:
        raise ValueError(f"{name} must be (min, max) with min <= max, got {value!r}")
    if positive and lo <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return lo, hi


def _check_probability(value: float, name: str) -> float:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
    return float(value)


class MultiCropGeometry:
    """Geometry stage of the multi-crop views: crop, resize and flip on the CPU, boxes and photometric draws.

    Defaults are the reference BYOL-style recipe (method doc section 3, ``contrast/data/transform.py``):
    global views RandomResizedCrop(224, scale (0.2, 1.0)), local views RandomResizedCrop(96, scale (0.08, 0.3)),
    ratio (3/4, 4/3), bicubic, horizontal flip p=0.5. The reference hard-codes 6 local views; here any
    ``num_local >= 0`` works.

    For each view, in order (globals, then locals): crop window (torchvision's algorithm, see
    :func:`sample_crop_params`), then the flip draw (``torch.rand(1) < flip_p``, as torchvision's
    RandomHorizontalFlip); after all views, the photometric parameters of all views. Every draw comes from the
    generator passed to ``__call__``, so a sample is a pure function of the image and the generator's state.

    Deviation: crop and resize are one ``Image.resize(..., box=crop)`` call instead of the reference's crop then
    resize. Inside the view the result is the same; at the view's border the resampling filter reads the true
    neighbouring pixels of the image instead of replicating the crop's edge (a difference confined to the outer
    one or two pixels of the view, and arguably the more faithful one). Resizing straight from the full image also
    avoids copying the crop.

    Args:
        global_size: side Sg of a global view in pixels.
        local_size: side Sl of a local view in pixels.
        num_global: number of global views G (>= 1).
        num_local: number of local views N (>= 0).
        global_scale: RandomResizedCrop area range of the global views.
        local_scale: RandomResizedCrop area range of the local views.
        ratio: RandomResizedCrop aspect-ratio range (w / h) of all views.
        flip_p: probability of a horizontal flip per view.
        interpolation: PIL resampling filter: ``"bicubic"`` (reference), ``"bilinear"``, ``"nearest"``,
            ``"lanczos"``, ``"box"`` or ``"hamming"``.
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        num_global: int = 2,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.2, 1.0),
        local_scale: tuple[float, float] = (0.08, 0.3),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
        interpolation: str = "bicubic",
    ) -> None:
        if global_size < 1 or local_size < 1:
            raise ValueError(f"view sizes must be >= 1, got global_size={global_size}, local_size={local_size}")
        if num_global < 1:
            raise ValueError(f"num_global must be >= 1, got {num_global}")
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        if interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {interpolation!r}")
        self.global_size = int(global_size)
        self.local_size = int(local_size)
        self.num_global = int(num_global)
        self.num_local = int(num_local)
        self.global_scale = _check_range(global_scale, "global_scale", positive=True)
        self.local_scale = _check_range(local_scale, "local_scale", positive=True)
        self.ratio = _check_range(ratio, "ratio", positive=True)
        self.flip_p = _check_probability(flip_p, "flip_p")
        self.interpolation = interpolation
        self._resample = _RESAMPLE[interpolation]

    @property
    def num_views(self) -> int:
        """V = G + N, the number of views per image."""
        return self.num_global + self.num_local

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(global_size={self.global_size}, local_size={self.local_size}, "
            f"num_global={self.num_global}, num_local={self.num_local}, global_scale={self.global_scale}, "
            f"local_scale={self.local_scale}, ratio={self.ratio}, flip_p={self.flip_p}, "
            f"interpolation={self.interpolation!r})"
        )

    def _make_views(
        self,
        image: Image.Image,
        count: int,
        size: int,
        scale: tuple[float, float],
        boxes: list[tuple[float, float, float, float]],
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        width, height = image.size
        # Kept uint8: the photometric stage converts to float on the training device.
        pixels = np.empty((count, 3, size, size), dtype=np.uint8)
        for k in range(count):
            i, j, h, w = sample_crop_params(height, width, scale=scale, ratio=self.ratio, generator=generator)
            flipped = bool(torch.rand(1, generator=generator).item() < self.flip_p)
            view = np.asarray(image.resize((size, size), self._resample, box=(j, i, j + w, i + h)))
            # (S, S, 3) -> (3, S, S), mirrored along the width when flipped; one copy into the batch array.
            view = view.transpose(2, 0, 1)
            pixels[k] = view[:, :, ::-1] if flipped else view
            boxes.append(crop_box(i, j, h, w, height=height, width=width, flipped=flipped))
        return torch.from_numpy(pixels)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Make all views of one image.

        Args:
            image: PIL image of any mode (converted with :func:`to_rgb`), at least 1 x 1 pixel.
            generator: CPU random number generator that fixes every random choice of this sample; ``None`` uses
                torch's global generator.

        Returns:
            A dict of tensors (``torch.utils.data.default_collate`` stacks it into a batch):

            * ``global_views``: (G, 3, Sg, Sg) uint8.
            * ``local_views``: (N, 3, Sl, Sl) uint8.
            * ``boxes``: (V, 4) float32 ``(x_ul, y_ul, x_lr, y_lr)`` of each view, globals then locals
              (see :func:`crop_box`).
            * ``photometric_params``: (V, P) float32 draws for :class:`MultiCropPhotometric`, same view order.
        """
        image = to_rgb(image)
        if image.width < 1 or image.height < 1:
            raise ValueError(f"image must be at least 1 x 1 pixel, got {image.height} x {image.width}")
        image.load()
        boxes: list[tuple[float, float, float, float]] = []
        global_views = self._make_views(image, self.num_global, self.global_size, self.global_scale, boxes, generator)
        local_views = self._make_views(image, self.num_local, self.local_size, self.local_scale, boxes, generator)
        return {
            "global_views": global_views,
            "local_views": local_views,
            "boxes": torch.tensor(boxes, dtype=torch.float32).view(self.num_views, 4),
            "photometric_params": sample_photometric_params((self.num_views,), generator=generator),
        }


# --------------------------------------------------------------------------------------------------------------
# View-major order
# --------------------------------------------------------------------------------------------------------------


def to_view_major(x: torch.Tensor) -> torch.Tensor:
    """Flatten a sample-major batch of views into view-major rows.

    Args:
        x: (B, V, ...) per-sample views (or boxes, or parameters).

    Returns:
        (V*B, ...) with row ``v * B + b`` holding ``x[b, v]``, the order in which the reference concatenates
        views for the backbone.
    """
    if x.ndim < 2:
        raise ValueError(f"expected a (B, V, ...) tensor, got shape {tuple(x.shape)}")
    # (B, V, ...) -> (V, B, ...) -> (V*B, ...)
    return x.transpose(0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def from_view_major(x: torch.Tensor, num_views: int) -> torch.Tensor:
    """Undo :func:`to_view_major`.

    Args:
        x: (V*B, ...) view-major rows.
        num_views: V.

    Returns:
        (B, V, ...) with ``out[b, v] = x[v * B + b]``.
    """
    if num_views < 1 or x.ndim < 1 or x.shape[0] % num_views:
        raise ValueError(f"cannot split a tensor of shape {tuple(x.shape)} into {num_views} views")
    # (V*B, ...) -> (V, B, ...) -> (B, V, ...)
    return x.reshape(num_views, x.shape[0] // num_views, *x.shape[1:]).transpose(0, 1)


# --------------------------------------------------------------------------------------------------------------
# Photometric (batched, any device)
# --------------------------------------------------------------------------------------------------------------


def _lerp(u: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # U(0, 1) draws -> U(lo, hi) values.
    return lo + (hi - lo) * u


def _per_view(values: torch.Tensor) -> torch.Tensor:
    # (M,) -> (M, 1, 1, 1), to broadcast a per-view value over (M, C, H, W).
    return values.view(-1, 1, 1, 1)


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) in [0, 1] -> (M, 1, H, W) luma, torchvision's grayscale weights."""
    r, g, b = x.unbind(dim=1)
    return (r * _LUMA_WEIGHTS[0] + g * _LUMA_WEIGHTS[1] + b * _LUMA_WEIGHTS[2]).unsqueeze(1)


def _blend_step(x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Apply one of brightness / contrast / saturation per view, as torchvision's ``_blend``.

    All three ops are ``clamp(factor * x + (1 - factor) * reference, 0, 1)``; only the reference differs:
    black for brightness, the mean luma of the view for contrast, the luma image for saturation.

    Args:
        x: (M, 3, H, W) in [0, 1].
        op: (M,) op id per view (``_BRIGHTNESS``, ``_CONTRAST`` or ``_SATURATION``; any other id is treated as
            brightness, so pass ``factor = 1`` there).
        factor: (M,) blend factor; 1 leaves the view unchanged exactly.

    Returns:
        (M, 3, H, W) in [0, 1].
    """
    gray = _luma(x)  # (M, 1, H, W)
    mean = gray.mean(dim=(1, 2, 3), keepdim=True)  # (M, 1, 1, 1)
    op = _per_view(op)
    reference = torch.where(op == _SATURATION, gray, torch.where(op == _CONTRAST, mean, torch.zeros_like(mean)))
    factor = _per_view(factor)
    return (x * factor + reference * (1.0 - factor)).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each view by ``shift`` turns, through HSV as torchvision's tensor ``adjust_hue`` does.

    Args:
        x: (M, 3, H, W) in [0, 1].
        shift: (M,) hue shift in turns, in [-0.5, 0.5].

    Returns:
        (M, 3, H, W) in [0, 1].
    """
    r, g, b = x.unbind(dim=1)  # each (M, H, W)
    value = x.amax(dim=1)
    chroma = value - x.amin(dim=1)
    has_hue = chroma > 0
    safe_chroma = torch.where(has_hue, chroma, torch.ones_like(chroma))
    # Hue sector in [0, 6): red, green or blue is the largest channel (ties resolved in that order).
    sector = torch.where(
        value == r,
        (g - b) / safe_chroma,
        torch.where(value == g, (b - r) / safe_chroma + 2.0, (r - g) / safe_chroma + 4.0),
    )
    hue = torch.where(has_hue, sector / 6.0, torch.zeros_like(sector))
    hue = torch.remainder(hue + shift.view(-1, 1, 1), 1.0)
    saturation = torch.where(has_hue, chroma / torch.where(value > 0, value, torch.ones_like(value)), 0.0)
    # HSV -> RGB: channel n (5 for red, 3 for green, 1 for blue) is v * (1 - s * clamp(min(k, 4 - k), 0, 1))
    # with k = (n + 6 * hue) mod 6.
    n = torch.arange(5.0, 0.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)  # (5, 3, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)  # (M, 3, H, W)
    ramp = torch.minimum(k, 4.0 - k).clamp_(0.0, 1.0)
    return value.unsqueeze(1) * (1.0 - saturation.unsqueeze(1) * ramp)


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur with a per-view sigma, replicate padding, one grouped convolution per axis.

    Args:
        x: (M, 3, H, W).
        sigma: (M,) standard deviation in pixels (> 0).
        apply: (M,) bool; views where it is False get a unit impulse kernel, i.e. stay unchanged.
        radius: kernel radius; the kernel has ``2 * radius + 1`` taps for every view.

    Returns:
        (M, 3, H, W).
    """
    m, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)  # (K,)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1)) ** 2)  # (M, K)
    kernel = kernel / kernel.sum(dim=1, keepdim=True)
    impulse = (taps == 0).to(x.dtype).expand_as(kernel)
    kernel = torch.where(apply.view(-1, 1), kernel, impulse)
    # (M, K) -> (M*3, K): the same kernel for the 3 channels of a view; one convolution group per channel.
    kernel = kernel.repeat_interleave(c, dim=0)
    # Replicate padding: PIL's box blurs, which the reference uses, extend the edge pixels the same way.
    padded = F.pad(x.reshape(1, m * c, h, w), (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(m * c, 1, 1, -1), groups=m * c)  # along W
    out = F.conv2d(out, kernel.view(m * c, 1, -1, 1), groups=m * c)  # along H
    # (1, M*3, H, W) -> (M, 3, H, W)
    return out.view(m, c, h, w)


class MultiCropPhotometric(nn.Module):
    """Photometric stage of the multi-crop views, batched on the training device.

    Per view, in the reference's order (method doc section 3, ``contrast/data/transform.py``):

    1. colour jitter with probability ``jitter_p``: brightness, contrast, saturation and hue factors drawn from
       torchvision's ``ColorJitter(brightness, contrast, saturation, hue)`` ranges, applied in a random order
       drawn per view (torchvision's semantics on [0, 1] floats, clamped to [0, 1] after each blend);
    2. grayscale with probability ``grayscale_p`` (luma copied to the 3 channels);
    3. Gaussian blur with sigma ~ U(``blur_sigma``) and a per-view-type probability;
    4. solarize (``x >= solarize_threshold`` -> ``1 - x``) with a per-view-type probability;
    5. normalization with ``mean`` / ``std``.

    Defaults: ColorJitter(0.4, 0.4, 0.2, 0.1) p=0.8, grayscale p=0.2, blur sigma U(0.1, 2.0) with p=1.0 for
    global view 1, 0.1 for global view 2 and 0.5 for local views, solarize p=0.2 on global view 2 only, ImageNet
    mean/std (method doc section 3 table).

    Deviations from the reference, which runs each op in PIL on uint8 images:

    * Everything runs on float32 in [0, 1] and follows torchvision's tensor functionals
      (``torchvision.transforms.v2.functional``). The reference's PIL ops round to uint8 after every op, take
      the contrast mean as a rounded integer and shift hue on an 8-bit HSV image, so its views differ from these
      by such rounding, not in distribution.
    * Blur: the reference's PIL ``GaussianBlur(radius=sigma)`` approximates a Gaussian of standard deviation
      sigma with three box-blur passes. Here the blur is an exact sampled Gaussian, separable, with
      ``2 * ceil(3 * max(blur_sigma)) + 1`` taps shared by the batch and each view's own sigma; edges replicate,
      as in PIL. Both have variance sigma^2; the shapes differ slightly (box passes give a piecewise-quadratic
      kernel).
    * Solarize: the reference's ``ImageOps.solarize`` (threshold 128) inverts uint8 values >= 128; the default
      ``solarize_threshold = 128 / 255`` inverts exactly the same grey levels of an unjittered image.

    Args:
        jitter_p: probability of the colour jitter.
        brightness: brightness factor range ``(max(0, 1 - brightness), 1 + brightness)``.
        contrast: contrast factor range ``(max(0, 1 - contrast), 1 + contrast)``.
        saturation: saturation factor range ``(max(0, 1 - saturation), 1 + saturation)``.
        hue: hue shift range ``(-hue, hue)`` in turns, ``0 <= hue <= 0.5``; 0 disables the op.
        grayscale_p: probability of grayscale conversion.
        blur_sigma: (min, max) range of the blur's standard deviation in pixels.
        global_blur_p: blur probability of each global view; its length sets G.
        local_blur_p: blur probability of every local view.
        global_solarize_p: solarize probability of each global view; same length as ``global_blur_p``.
        local_solarize_p: solarize probability of every local view.
        solarize_threshold: solarize threshold on [0, 1] pixel values.
        mean: per-channel normalization mean (RGB).
        std: per-channel normalization standard deviation (RGB).
    """

    def __init__(
        self,
        *,
        jitter_p: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        saturation: float = 0.2,
        hue: float = 0.1,
        grayscale_p: float = 0.2,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        global_blur_p: Sequence[float] = (1.0, 0.1),
        local_blur_p: float = 0.5,
        global_solarize_p: Sequence[float] = (0.0, 0.2),
        local_solarize_p: float = 0.0,
        solarize_threshold: float = 128.0 / 255.0,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        super().__init__()
        self.jitter_p = _check_probability(jitter_p, "jitter_p")
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.factor_ranges = {
            _BRIGHTNESS: (max(0.0, 1.0 - brightness), 1.0 + brightness),
            _CONTRAST: (max(0.0, 1.0 - contrast), 1.0 + contrast),
            _SATURATION: (max(0.0, 1.0 - saturation), 1.0 + saturation),
        }
        self.hue = float(hue)
        self.grayscale_p = _check_probability(grayscale_p, "grayscale_p")
        self.blur_sigma = _check_range(blur_sigma, "blur_sigma", positive=True)
        self.blur_radius = math.ceil(3.0 * self.blur_sigma[1])
        if len(global_blur_p) < 1 or len(global_blur_p) != len(global_solarize_p):
            raise ValueError(
                "global_blur_p and global_solarize_p need one probability per global view (same length >= 1), "
                f"got {len(global_blur_p)} and {len(global_solarize_p)}"
            )
        self.global_blur_p = tuple(_check_probability(p, "global_blur_p") for p in global_blur_p)
        self.global_solarize_p = tuple(_check_probability(p, "global_solarize_p") for p in global_solarize_p)
        self.local_blur_p = _check_probability(local_blur_p, "local_blur_p")
        self.local_solarize_p = _check_probability(local_solarize_p, "local_solarize_p")
        if not 0.0 <= solarize_threshold <= 1.0:
            raise ValueError(f"solarize_threshold must be in [0, 1], got {solarize_threshold}")
        self.solarize_threshold = float(solarize_threshold)
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ValueError(f"mean and std need 3 channels with std > 0, got mean={mean}, std={std}")
        # Not persistent: fixed settings, not state to checkpoint.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def num_global(self) -> int:
        """G, the number of global views this module expects."""
        return len(self.global_blur_p)

    def extra_repr(self) -> str:
        return (
            f"jitter_p={self.jitter_p}, factor_ranges={self.factor_ranges}, hue={self.hue}, "
            f"grayscale_p={self.grayscale_p}, blur_sigma={self.blur_sigma}, global_blur_p={self.global_blur_p}, "
            f"local_blur_p={self.local_blur_p}, global_solarize_p={self.global_solarize_p}, "
            f"local_solarize_p={self.local_solarize_p}, solarize_threshold={self.solarize_threshold:.6f}"
        )

    def _color_jitter(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W), (M, P) -> (M, 3, H, W): the four jitter ops in each view's own order.

        The three blend ops are cheap; hue (an HSV round trip) is not, so it runs once: first every view's blend
        ops that precede its hue op, then hue, then the blend ops that follow it. A blend step that does not
        apply to a view uses factor 1, which leaves the view unchanged exactly.
        """
        apply = params[:, PhotometricParam.JITTER_APPLY] < self.jitter_p  # (M,)
        one = torch.ones_like(params[:, 0])
        factors = torch.stack(
            [
                torch.where(apply, _lerp(params[:, slot], *self.factor_ranges[op]), one)
                for op, slot in (
                    (_BRIGHTNESS, PhotometricParam.BRIGHTNESS),
                    (_CONTRAST, PhotometricParam.CONTRAST),
                    (_SATURATION, PhotometricParam.SATURATION),
                )
            ]
            + [one],  # the hue op is never a blend
            dim=1,
        )  # (M, 4), indexed by op id
        order = params[:, _ORDER_SLOTS].argsort(dim=1)  # (M, 4): op id at each position
        hue_position = (order == _HUE).int().argmax(dim=1)  # (M,)
        for before_hue, positions in ((True, range(3)), (False, range(1, 4))):
            for position in positions:
                op = order[:, position]
                active = position < hue_position if before_hue else position > hue_position
                factor = torch.where(active, factors.gather(1, op.view(-1, 1)).squeeze(1), one)
                x = _blend_step(x, op, factor)
            if before_hue and self.hue > 0:
                shift = _lerp(params[:, PhotometricParam.HUE], -self.hue, self.hue)
                x = torch.where(_per_view(apply), _adjust_hue(x, shift), x)
        return x

    def _augment(
        self, views: torch.Tensor, params: torch.Tensor, blur_p: Sequence[float], solarize_p: Sequence[float]
    ) -> torch.Tensor:
        """Augment one view type.

        Args:
            views: (B, V, 3, S, S) uint8 (or float in [0, 1]).
            params: (B, V, P).
            blur_p: blur probability of each of the V views.
            solarize_p: solarize probability of each of the V views.

        Returns:
            (V*B, 3, S, S) float32, view-major, normalized.
        """
        batch = views.shape[0]
        mean, std = self.mean.to(views.device), self.std.to(views.device)
        x = to_view_major(views)  # (B, V, 3, S, S) -> (V*B, 3, S, S)
        x = x.float().div_(255.0) if views.dtype == torch.uint8 else x.float()
        params = to_view_major(params.float())  # (B, V, P) -> (V*B, P)
        if x.shape[0] == 0:
            return (x - mean) / std

        def per_row(probabilities: Sequence[float]) -> torch.Tensor:
            # (V,) -> (V*B,): row v * B + b holds view v's probability. Filled on the device: no host copy.
            return torch.cat([torch.full((batch,), p, dtype=params.dtype, device=params.device) for p in probabilities])

        if self.jitter_p > 0:
            x = self._color_jitter(x, params)
        if self.grayscale_p > 0:
            gray = _per_view(params[:, PhotometricParam.GRAYSCALE_APPLY] < self.grayscale_p)
            x = torch.where(gray, _luma(x).expand_as(x), x)
        if max(blur_p) > 0:
            apply = params[:, PhotometricParam.BLUR_APPLY] < per_row(blur_p)
            sigma = _lerp(params[:, PhotometricParam.BLUR_SIGMA], *self.blur_sigma)
            x = _gaussian_blur(x, sigma, apply, self.blur_radius)
        if max(solarize_p) > 0:
            apply = _per_view(params[:, PhotometricParam.SOLARIZE_APPLY] < per_row(solarize_p))
            x = torch.where(apply & (x >= self.solarize_threshold), 1.0 - x, x)
        return (x - mean) / std

    def _check_views(self, views: torch.Tensor, name: str) -> None:
        if views.ndim != 5 or views.shape[2] != 3 or views.shape[3] != views.shape[4]:
            raise ValueError(f"{name} must have shape (B, V, 3, S, S), got {tuple(views.shape)}")
        if views.dtype != torch.uint8 and not views.is_floating_point():
            raise TypeError(f"{name} must be uint8 (or floating point in [0, 1]), got {views.dtype}")

    @torch.no_grad()
    def forward(
        self,
        global_views: torch.Tensor,
        local_views: torch.Tensor,
        photometric_params: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a collated batch of views.

        Args:
            global_views: (B, G, 3, Sg, Sg) uint8 global views.
            local_views: (B, N, 3, Sl, Sl) uint8 local views (N may be 0).
            photometric_params: (B, G+N, P) draws from :class:`MultiCropGeometry`; when ``None`` they are drawn
                here with :func:`sample_photometric_params` from ``generator``.
            generator: generator for the draws when ``photometric_params`` is ``None``.
            dtype: dtype of the outputs; the computation itself is float32 (autocast is disabled inside).

        Returns:
            ``(global_out, local_out)``: (G*B, 3, Sg, Sg) and (N*B, 3, Sl, Sl) normalized views on the input's
            device, in view-major order (row ``v * B + b`` is view ``v`` of sample ``b``).
        """
        self._check_views(global_views, "global_views")
        self._check_views(local_views, "local_views")
        batch, num_global = global_views.shape[:2]
        num_local = local_views.shape[1]
        if local_views.shape[0] != batch:
            raise ValueError(
                f"global_views and local_views disagree on the batch size: {batch} vs {local_views.shape[0]}"
            )
        if num_global != self.num_global:
            raise ValueError(
                f"global_views has {num_global} global views, but the photometric settings are for "
                f"{self.num_global} (length of global_blur_p)"
            )
        device = global_views.device
        if local_views.device != device:
            raise ValueError(f"global_views is on {device} but local_views is on {local_views.device}")
        expected = (batch, num_global + num_local, NUM_PHOTOMETRIC_PARAMS)
        if photometric_params is None:
            photometric_params = sample_photometric_params(expected[:2], generator=generator, device=device)
        elif tuple(photometric_params.shape) != expected:
            raise ValueError(
                f"photometric_params must have shape (B, G+N, P) = {expected}, got {tuple(photometric_params.shape)}"
            )
        photometric_params = photometric_params.to(device)
        with torch.autocast(device_type=device.type, enabled=False):
            global_out = self._augment(
                global_views, photometric_params[:, :num_global], self.global_blur_p, self.global_solarize_p
            )
            local_out = self._augment(
                local_views,
                photometric_params[:, num_global:],
                (self.local_blur_p,) * num_local,
                (self.local_solarize_p,) * num_local,
            )
        return global_out.to(dtype), local_out.to(dtype)
