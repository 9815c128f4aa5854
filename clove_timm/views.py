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
import functools
import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_PHOTOMETRIC_PARAMS",
    "TRANSPARENT_BACKGROUND",
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


TRANSPARENT_BACKGROUND: tuple[int, int, int] = (124, 116, 104)
"""Colour that :func:`to_rgb` composites transparent pixels on: the ImageNet mean (``IMAGENET_MEAN * 255``,
rounded), so a transparent region normalizes to about zero instead of to an arbitrary colour."""

# Modes with an alpha band (premultiplied ones included); other modes may carry a "transparency" colour key.
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


def to_rgb(image: Image.Image, *, background: tuple[int, int, int] = TRANSPARENT_BACKGROUND) -> Image.Image:
    """Convert a PIL image of any mode to 8-bit RGB.

    Pillow's ``convert("RGB")`` clips 16-bit and 32-bit integer and float images to [0, 255], which turns most of
    a 16-bit image white and a [0, 1] float image black; those modes are rescaled here instead:

    * ``I;16*``: divided by 257 (65535 -> 255).
    * ``I``: divided by 257 when the maximum exceeds 255 (a 16-bit image stored as 32-bit), else used as is;
      negative values clip to 0.
    * ``F``: multiplied by 255 when the maximum is at most 1 (a [0, 1] image), else clipped to [0, 255].

    Transparency (an alpha band, or a palette / colour-key ``transparency`` entry) is composited over the fixed
    ``background``: ``out = alpha * colour + (1 - alpha) * background``. Deviation from the reference, whose
    ``ImageFolder`` loader (``img.convert("RGB")``) drops alpha and keeps whatever colour transparent pixels
    happen to store (often black, sometimes leftovers of an edit): here the views do not depend on that hidden
    colour.

    Args:
        image: PIL image of any mode.
        background: RGB colour under transparent pixels (default :data:`TRANSPARENT_BACKGROUND`).

    Returns:
        The image in mode ``RGB`` (the same object when it already is RGB without transparency).

    Raises:
        TypeError: ``image`` is not a PIL image.
        ValueError: Pillow cannot convert the mode to RGB.
    """
    if not isinstance(image, Image.Image):
        raise TypeError(f"expected a PIL image, got {type(image).__name__}")
    mode = image.mode
    transparent = mode in _ALPHA_MODES or "transparency" in image.info
    if mode == "RGB" and not transparent:
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
    try:
        if transparent:
            base = Image.new("RGBA", image.size, (*background, 255))
            return Image.alpha_composite(base, image.convert("RGBA")).convert("RGB")
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


def _luma_into(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) in [0, 1] -> luma written into ``out`` (M, H, W); torchvision's grayscale weights and order."""
    r, g, b = x.unbind(dim=1)
    torch.mul(r, _LUMA_WEIGHTS[0], out=out)
    return out.add_(g, alpha=_LUMA_WEIGHTS[1]).add_(b, alpha=_LUMA_WEIGHTS[2])


def _luma(x: torch.Tensor) -> torch.Tensor:
    """(M, 3, H, W) in [0, 1] -> (M, 1, H, W) luma."""
    return _luma_into(x, x.new_empty((x.shape[0], *x.shape[2:]))).unsqueeze(1)


def _blend_(
    x: torch.Tensor, op: torch.Tensor, factor: torch.Tensor, ops_present: Sequence[bool], scratch: torch.Tensor
) -> None:
    """Apply one of brightness / contrast / saturation per view, in place, as torchvision's ``_blend``.

    All three ops are ``clamp(factor * x + (1 - factor) * reference, 0, 1)``; only the reference differs: black for
    brightness, the mean luma of the view for contrast, the luma image for saturation. Here every view of the batch
    runs its own op in one ``lerp_`` towards a per-view reference and one ``clamp_``.

    Args:
        x: (M, 3, H, W) in [0, 1], modified in place.
        op: (M,) op id per view (``_BRIGHTNESS``, ``_CONTRAST`` or ``_SATURATION``).
        factor: (M,) blend factor; 1 leaves the view unchanged exactly.
        ops_present: whether any view has brightness / contrast / saturation (all ``True`` when unknown without a
            device synchronisation); the luma image and the mean are computed only when needed.
        scratch: (M, H, W) float32 buffer for the luma image.
    """
    has_brightness, has_contrast, has_saturation = ops_present
    if has_saturation:
        reference = _luma_into(x, scratch).unsqueeze(1)  # (M, 1, H, W)
        if has_brightness or has_contrast:
            # reference * keep + offset: saturation views keep the luma image, contrast views get its mean,
            # brightness views black. Multiplying by exact 0 or 1 and adding 0 select without rounding.
            keep = _per_view(op == _SATURATION).to(x.dtype)
            if has_contrast:
                offset = reference.mean(dim=(2, 3), keepdim=True) * _per_view(op == _CONTRAST)  # (M, 1, 1, 1)
                torch.addcmul(offset, reference, keep, out=reference)
            else:
                reference.mul_(keep)
    elif has_contrast:
        # Mean luma from the channel means: one reduction pass instead of building the luma image.
        channel_means = x.mean(dim=(2, 3))  # (M, 3)
        mean = channel_means[:, 0] * _LUMA_WEIGHTS[0]
        mean = mean + channel_means[:, 1] * _LUMA_WEIGHTS[1] + channel_means[:, 2] * _LUMA_WEIGHTS[2]
        reference = _per_view(mean * (op == _CONTRAST))  # (M, 1, 1, 1); brightness views blend towards 0
    else:
        x.mul_(_per_view(factor)).clamp_(0.0, 1.0)
        return
    # factor * x + (1 - factor) * reference == lerp(x, reference, 1 - factor); weight 0 returns x exactly.
    x.lerp_(reference, _per_view(1.0 - factor)).clamp_(0.0, 1.0)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor, out: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each view by ``shift`` turns, as torchvision's tensor ``adjust_hue`` (HSV round trip).

    With value ``V = max(r, g, b)`` and chroma ``C = V - min(r, g, b)``, HSV -> RGB gives channel ``n`` (5 red,
    3 green, 1 blue) as ``V * (1 - S * ramp(k))`` with ``S = C / V``, ``k = (n + 6 * hue) mod 6`` and
    ``ramp(k) = clamp(min(k, 4 - k), 0, 1) = 1 - clamp(|k - 2| - 1, 0, 1)`` on [0, 6). That is
    ``(V - C) + C * clamp(|k - 2| - 1, 0, 1)``: saturation is never formed, the ``mod 1`` of the hue folds into the
    ``mod 6``, and the work is a fixed sequence of in-place ops on ``out`` and six planes of ``scratch``, with no
    large allocation.

    Args:
        x: (M, 3, H, W) in [0, 1].
        shift: (M,) hue shift in turns, in [-0.5, 0.5].
        out: (M, 3, H, W) tensor for the result; may be ``x`` itself.
        scratch: (6, M, H, W) float32 work buffer.

    Returns:
        ``out``, (M, 3, H, W) in [0, 1].
    """
    r, g, b = x.unbind(dim=1)  # each (M, H, W)
    value, chroma, red_max, green_max, sector, work = scratch.unbind(0)
    torch.maximum(torch.maximum(r, g, out=value), b, out=value)
    torch.minimum(torch.minimum(r, g, out=chroma), b, out=chroma)
    torch.sub(value, chroma, out=chroma)
    torch.eq(r, value, out=red_max)  # 1.0 where red is the largest channel
    torch.eq(g, value, out=green_max)
    # 6 * hue in (-1, 5]: blue largest (r - g) / C + 4, green (b - r) / C + 2, red (g - b) / C; on ties red wins,
    # then green, as in torchvision. lerp with weights exactly 0 or 1 selects without rounding.
    torch.sub(r, g, out=sector).add_(chroma, alpha=4.0)
    sector.lerp_(torch.sub(b, r, out=work).add_(chroma, alpha=2.0), green_max)
    sector.lerp_(torch.sub(g, b, out=work), red_max)
    # Gray pixels (C = 0) have a zero numerator; any positive divisor gives them hue 0, as torchvision.
    sector.div_(torch.clamp_min(chroma, torch.finfo(x.dtype).tiny, out=work))
    sector.add_(shift.view(-1, 1, 1), alpha=6.0)
    # (M, H, W) -> (M, 3, H, W): k for each channel, then clamp(|k - 2| - 1, 0, 1); x is not read past this point.
    # n = 5, 3, 1 for red, green, blue, plus 6 so that k is positive (6 * hue > -1, 6 * shift >= -3). Built with
    # arange, not from a Python list: no host-to-device copy, which would synchronise.
    offsets = torch.arange(11.0, 6.0, -2.0, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    torch.add(sector.unsqueeze(1), offsets, out=out)
    # k mod 6 of a positive k as 6 * frac(k / 6): three cheap in-place passes instead of one slow fmod.
    out.div_(6.0).frac_().mul_(6.0).sub_(2.0).abs_().sub_(1.0).clamp_(0.0, 1.0)
    minimum = torch.sub(value, chroma, out=red_max)
    return torch.addcmul(minimum.unsqueeze(1), chroma.unsqueeze(1), out, out=out)


def _gaussian_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(M,) standard deviations -> (M, 2 * radius + 1) normalized sampled Gaussians (float32)."""
    taps = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device)  # (K,)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.float().view(-1, 1)) ** 2)  # (M, K)
    return kernel / kernel.sum(dim=1, keepdim=True)


def _pil_blur_radius(max_sigma: float) -> int:
    """Reach of the box of :func:`_pil_box_kernels` for sigmas up to ``max_sigma`` (``l + 1`` taps each side)."""
    return math.floor((math.sqrt(4.0 * max_sigma**2 + 1.0) - 1.0) / 2.0) + 1


def _pil_box_kernels(sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """(M,) sigmas -> (M, 2 * radius + 1): one pass of PIL's ``GaussianBlur(radius=sigma)``, in float.

    PIL blurs with three passes of an extended box filter along each axis (Gwosdek et al., SSVM 2011; Pillow
    ``BoxBlur.c``): ``2 l + 1`` taps of weight 1 and one tap of weight ``a`` on each side, normalized, where ``l``
    and ``a`` are chosen so that the three passes have variance exactly ``sigma ** 2``. ``radius`` must be at least
    :func:`_pil_blur_radius` of the largest sigma.
    """
    sigma2 = sigma.float().view(-1, 1) ** 2 / 3.0  # variance of one pass
    inner = torch.floor((torch.sqrt(12.0 * sigma2 + 1.0) - 1.0) / 2.0)  # l
    fraction = (2.0 * inner + 1.0) * (inner * (inner + 1.0) - 3.0 * sigma2) / (6.0 * (sigma2 - (inner + 1.0) ** 2))
    distance = torch.arange(-radius, radius + 1, dtype=torch.float32, device=sigma.device).abs().view(1, -1)
    box = torch.where(distance <= inner, 1.0, torch.where(distance == inner + 1.0, fraction, 0.0))  # (M, K)
    return box / box.sum(dim=1, keepdim=True)


def _separable_blur(x: torch.Tensor, kernels: torch.Tensor, passes: int) -> torch.Tensor:
    """Separable blur with a per-view kernel: ``passes`` passes along W, then along H, one grouped convolution each.

    Every pass pads by replicating the edge pixels, as PIL's box blurs (which the reference uses) do.

    Args:
        x: (M, 3, H, W).
        kernels: (M, 2 R + 1) normalized 1-D kernels, the same for both axes.
        passes: passes per axis.

    Returns:
        (M, 3, H, W), a new tensor.
    """
    m, c, h, w = x.shape
    radius = kernels.shape[1] // 2
    # (M, K) -> (M*3, K): the same kernel for the 3 channels of a view; one convolution group per channel.
    kernel = kernels.to(x.dtype).repeat_interleave(c, dim=0)
    out = x.reshape(1, m * c, h, w)
    for _ in range(passes):
        out = F.conv2d(F.pad(out, (radius, radius, 0, 0), mode="replicate"), kernel.view(m * c, 1, 1, -1), groups=m * c)
    for _ in range(passes):
        out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(m * c, 1, -1, 1), groups=m * c)
    # (1, M*3, H, W) -> (M, 3, H, W)
    return out.view(m, c, h, w)


# From this many pixels per view on, the CPU blurs view by view (below it the per-op overhead of the Python loop
# costs more than the grouped convolution saves; measured on a 2-core Xeon: equal at 96 x 96, the loop about twice
# as fast at 224 x 224).
_PER_VIEW_BLUR_MIN_PIXELS = 96 * 96
# Taps lighter than this are skipped by the view-by-view blur: a change below 2e-11 of a [0, 1] pixel.
_NEGLIGIBLE_TAP = 1e-12


def _separable_blur_views_(x: torch.Tensor, rows: Sequence[int], kernels: torch.Tensor, passes: int) -> None:
    """The blur of :func:`_separable_blur`, in place, one view at a time, as shifted adds with host-side weights.

    Each view needs only small temporaries (no batch-sized allocation) and only the taps its own kernel reaches.

    Args:
        x: (M, 3, H, W), the listed rows modified in place.
        rows: indices of the rows to blur.
        kernels: (M, 2 R + 1) symmetric normalized 1-D kernels of every row.
        passes: passes per axis.
    """
    if not rows:
        return
    _, _, height, width = x.shape
    radius = kernels.shape[1] // 2
    for row, weights in zip(rows, kernels[list(rows)].tolist(), strict=True):
        reach = radius - next(i for i, weight in enumerate(weights) if weight >= _NEGLIGIBLE_TAP)
        weights = weights[radius - reach : radius + reach + 1]
        view = x[row]  # (3, H, W)
        for axis_pass in range(2 * passes):
            along_width = axis_pass < passes
            padded = F.pad(view, (reach, reach, 0, 0) if along_width else (0, 0, reach, reach), mode="replicate")
            # The window of tap t: columns (or rows) t .. t + size - 1 of the padded view.
            dim, size = (2, width) if along_width else (1, height)
            torch.mul(padded.narrow(dim, 0, size), weights[0], out=view)
            for tap in range(1, 2 * reach + 1):
                view.add_(padded.narrow(dim, tap, size), alpha=weights[tap])


def _update_rows_(
    x: torch.Tensor,
    active: torch.Tensor,
    subset: bool,
    op: Callable[..., torch.Tensor],
    *row_args: torch.Tensor,
) -> None:
    """``x[r] = op(x[r], *row_args[r])`` in place for the rows ``r`` where ``active``; other rows stay untouched.

    Args:
        x: (M, 3, H, W), modified in place.
        active: (M,) bool.
        subset: run ``op`` on the active rows only (``index_select`` / ``index_copy_``; finding them reads
            ``active`` on the host, a synchronisation on an accelerator) or on every row followed by a
            ``torch.where`` (no synchronisation).
        op: function of ``(rows, *row_args)`` returning the new rows; it must not modify ``rows``.
        row_args: (M, ...) per-row arguments of ``op``.
    """
    if not subset:
        torch.where(_per_view(active), op(x, *row_args), x, out=x)
        return
    index = active.nonzero().squeeze(1)
    if index.numel() == x.shape[0]:
        x.copy_(op(x, *row_args))
    elif index.numel():
        x.index_copy_(0, index, op(x.index_select(0, index), *(a.index_select(0, index) for a in row_args)))


def _solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    # (M, 3, H, W) -> new (M, 3, H, W): values at or above the threshold inverted, as torchvision's solarize.
    return torch.where(x >= threshold, 1.0 - x, x)


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

    How the batch is processed: every op works in place on one float32 buffer (allocations of batch-sized tensors
    are what an eager pipeline pays most for on the CPU), and an op reaches only the views that drew it. With
    ``subset_rows`` (the default on the CPU), the rows are first sorted by jitter draw and position of the hue op,
    which makes each colour-jitter stage a contiguous slice of the batch; grayscale, blur and solarize run on the
    selected rows only, the blur of views of 96 x 96 pixels or more view by view with the taps that view's sigma
    reaches. This reads the draws on the host, a device synchronisation on an accelerator. Without it (the default
    elsewhere), every stage runs on all rows, views that skip a blend get factor 1 (an exact no-op) and the other
    ops are merged with ``torch.where``: no synchronisation. The two agree to float32 rounding.

    Deviations from the reference, which runs each op in PIL on uint8 images:

    * Everything runs on float32 in [0, 1] and follows torchvision's tensor functionals
      (``torchvision.transforms.v2.functional``). The reference's PIL ops round to uint8 after every op, take
      the contrast mean as a rounded integer and shift hue on an 8-bit HSV image, so its views differ from these
      by such rounding, not in distribution (``tests/test_views_distribution.py`` compares the two).
    * Blur: the reference's PIL ``GaussianBlur(radius=sigma)`` is three passes of an extended box filter whose
      variance is exactly sigma^2. The default here is a sampled Gaussian, separable, with
      ``2 * ceil(3 * max(blur_sigma)) + 1`` taps shared by the batch and each view's own sigma; edges replicate, as
      in PIL. Its variance equals sigma^2 from sigma = 0.7 up, but falls below it for smaller sigmas (0.21 instead
      of 0.25 at sigma 0.5, 0.008 instead of 0.09 at 0.3, almost 0 at 0.1): the mildest of the reference's blurs
      come out milder (``tests/test_views_distribution.py`` measures it). ``blur_kernel="pil"`` runs the
      reference's own filter, three box passes per axis with edge replication, in float. On CUDA, cuDNN may run the
      blur convolution in TF32 (``torch.backends.cudnn.allow_tf32``), about 1e-3 relative, far below the
      reference's 8-bit rounding.
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
        blur_kernel: ``"gaussian"``, a sampled Gaussian (default), or ``"pil"``, the three-pass extended box filter
            of the reference's PIL ``GaussianBlur`` (see the blur deviation above).
        subset_rows: apply each op to the rows that drew it only (host-side decisions) or to all rows with masks
            (no device synchronisation); ``None`` picks subsets on the CPU and masks on any other device.
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
        blur_kernel: str = "gaussian",
        subset_rows: bool | None = None,
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
        if blur_kernel not in ("gaussian", "pil"):
            raise ValueError(f"blur_kernel must be 'gaussian' or 'pil', got {blur_kernel!r}")
        self.blur_kernel = blur_kernel
        # Kernel radius and passes per axis: one Gaussian, or the three box passes of PIL.
        if blur_kernel == "gaussian":
            self.blur_radius, self.blur_passes = math.ceil(3.0 * self.blur_sigma[1]), 1
        else:
            self.blur_radius, self.blur_passes = _pil_blur_radius(self.blur_sigma[1]), 3
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
        self.subset_rows = subset_rows
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
            f"local_solarize_p={self.local_solarize_p}, solarize_threshold={self.solarize_threshold:.6f}, "
            f"blur_kernel={self.blur_kernel!r}, subset_rows={self.subset_rows}"
        )

    def _color_jitter_(self, x: torch.Tensor, params: torch.Tensor, subset: bool) -> None:
        """(M, 3, H, W), (M, P): the four jitter ops in each view's own order, in place.

        The three blend ops are cheap; hue (an HSV round trip) is not, so it runs once: first every view's blend
        ops that precede its hue op (positions 0-2), then hue, then the blend ops that follow it (positions 1-3),
        six blend stages in all. With ``subset`` the rows must come sorted by :meth:`_jitter_sort_key`: every
        stage is then a contiguous slice of rows that all run it. Otherwise every stage covers all rows, and a row
        that does not run it gets factor 1.
        """
        num_rows = x.shape[0]
        apply = params[:, PhotometricParam.JITTER_APPLY] < self.jitter_p  # (M,)
        one = torch.ones_like(params[:, 0])
        factors = torch.stack(
            [
                _lerp(params[:, PhotometricParam.BRIGHTNESS], *self.factor_ranges[_BRIGHTNESS]),
                _lerp(params[:, PhotometricParam.CONTRAST], *self.factor_ranges[_CONTRAST]),
                _lerp(params[:, PhotometricParam.SATURATION], *self.factor_ranges[_SATURATION]),
                one,  # the hue op is never a blend
            ],
            dim=1,
        )  # (M, 4), indexed by op id
        order = params[:, _ORDER_SLOTS].argsort(dim=1)  # (M, 4): op id at each position
        hue_position = (order == _HUE).int().argmax(dim=1)  # (M,)
        # Work planes for the luma image and the hue round trip, allocated once for all stages.
        scratch = x.new_empty((6 if self.hue > 0 else 1, num_rows, *x.shape[2:]))
        if subset:
            # Rows are sorted: no jitter first, then hue at position 0, 1, 2, 3. first_row[q]: first row whose hue
            # op is at position q (q = 4: the end).
            counts = torch.bincount(self._jitter_sort_key(params) + 1, minlength=5).tolist()
            first_row = [sum(counts[: q + 1]) for q in range(5)]
        for before_hue, positions in ((True, range(3)), (False, range(1, 4))):
            for position in positions:
                if subset:
                    # Before hue: rows whose hue op comes later; after hue: rows whose hue op came earlier.
                    if before_hue:
                        start, stop = first_row[position + 1], num_rows
                    else:
                        start, stop = counts[0], first_row[position]
                    rows = slice(start, stop)
                    if start >= stop:
                        continue
                    op = order[rows, position]
                    factor = factors[rows].gather(1, op.view(-1, 1)).squeeze(1)
                    present = torch.bincount(op, minlength=4).tolist()
                    ops_present = [count > 0 for count in present[:3]]
                else:
                    rows = slice(None)
                    op = order[:, position]
                    active = apply & (position < hue_position if before_hue else position > hue_position)
                    factor = torch.where(active, factors.gather(1, op.view(-1, 1)).squeeze(1), one)
                    ops_present = (True, True, True)
                _blend_(x[rows], op, factor, ops_present, scratch[0, rows])
            if before_hue and self.hue > 0:
                shift = _lerp(params[:, PhotometricParam.HUE], -self.hue, self.hue)
                if subset:
                    jittered = x[counts[0] :]
                    _adjust_hue(jittered, shift[counts[0] :], jittered, scratch[:, counts[0] :])
                else:
                    torch.where(_per_view(apply), _adjust_hue(x, shift, torch.empty_like(x), scratch), x, out=x)

    def _jitter_sort_key(self, params: torch.Tensor) -> torch.Tensor:
        """(M, P) -> (M,) int64: -1 for views without colour jitter, else the position (0-3) of the hue op."""
        apply = params[:, PhotometricParam.JITTER_APPLY] < self.jitter_p
        order = params[:, _ORDER_SLOTS].argsort(dim=1)
        hue_position = (order == _HUE).int().argmax(dim=1)
        return torch.where(apply, hue_position, -1).long()

    def _augment(
        self,
        views: torch.Tensor,
        params: torch.Tensor,
        blur_p: Sequence[float],
        solarize_p: Sequence[float],
        *,
        dtype: torch.dtype,
        memory_format: torch.memory_format,
    ) -> torch.Tensor:
        """Augment one view type.

        Args:
            views: (B, V, 3, S, S) uint8 (or float in [0, 1]).
            params: (B, V, P).
            blur_p: blur probability of each of the V views.
            solarize_p: solarize probability of each of the V views.
            dtype: dtype of the result.
            memory_format: memory format of the result.

        Returns:
            (V*B, 3, S, S), view-major, normalized.
        """
        batch, num_views, channels, height, width = views.shape
        num_rows = batch * num_views
        device = views.device
        mean, std = self.mean.to(device), self.std.to(device)
        params = to_view_major(params.float())  # (B, V, P) -> (V*B, P)
        subset = self.subset_rows if self.subset_rows is not None else device.type == "cpu"
        if num_rows == 0:
            return torch.empty((0, channels, height, width), dtype=dtype, device=device)

        def per_row(probabilities: Sequence[float]) -> torch.Tensor:
            # (V,) -> (V*B,): row v * B + b holds view v's probability. Filled on the device: no host copy.
            return torch.cat([torch.full((batch,), p, dtype=params.dtype, device=device) for p in probabilities])

        blur_p_rows, solarize_p_rows = per_row(blur_p), per_row(solarize_p)
        permutation = None
        if subset and self.jitter_p > 0:
            permutation = torch.argsort(self._jitter_sort_key(params), stable=True)  # (M,)
            params = params[permutation]
            blur_p_rows, solarize_p_rows = blur_p_rows[permutation], solarize_p_rows[permutation]
            # Sorted row i is view-major row permutation[i] = v * B + b: view v of sample b.
            source = views[permutation % batch, permutation // batch]  # (M, 3, S, S), still uint8
            x = torch.empty((num_rows, channels, height, width), dtype=torch.float32, device=device)
        else:
            # (B, V, 3, S, S) -> (V, B, 3, S, S), written into (V*B, 3, S, S) by the conversion's copy.
            source = views.transpose(0, 1)
            x = torch.empty((num_views, batch, channels, height, width), dtype=torch.float32, device=device)
        # An in-place division after the copy: the same float32 quotient as uint8 / 255.0, without the slower
        # mixed-dtype division kernel.
        x.copy_(source)
        if views.dtype == torch.uint8:
            x.div_(255.0)
        x = x.view(num_rows, channels, height, width)

        if self.jitter_p > 0:
            self._color_jitter_(x, params, subset)
        if self.grayscale_p > 0:
            gray = params[:, PhotometricParam.GRAYSCALE_APPLY] < self.grayscale_p
            _update_rows_(x, gray, subset, lambda rows: _luma(rows).expand_as(rows))
        if max(blur_p) > 0:
            blur = params[:, PhotometricParam.BLUR_APPLY] < blur_p_rows
            sigma = _lerp(params[:, PhotometricParam.BLUR_SIGMA], *self.blur_sigma)
            make_kernels = _gaussian_kernels if self.blur_kernel == "gaussian" else _pil_box_kernels
            kernels = make_kernels(sigma, self.blur_radius)  # (M, 2 R + 1)
            if subset and height * width >= _PER_VIEW_BLUR_MIN_PIXELS:
                _separable_blur_views_(x, blur.nonzero().squeeze(1).tolist(), kernels, self.blur_passes)
            else:
                blur_rows = functools.partial(_separable_blur, passes=self.blur_passes)
                _update_rows_(x, blur, subset, blur_rows, kernels)
        if max(solarize_p) > 0:
            solarize = params[:, PhotometricParam.SOLARIZE_APPLY] < solarize_p_rows
            _update_rows_(x, solarize, subset, lambda rows: _solarize(rows, self.solarize_threshold))
        x.sub_(mean).div_(std)

        if permutation is None and dtype == torch.float32 and memory_format == torch.contiguous_format:
            return x
        out = torch.empty(x.shape, dtype=dtype, device=device, memory_format=memory_format)
        if permutation is None:
            return out.copy_(x)
        # Sorted row i is view-major row permutation[i].
        return out.index_copy_(0, permutation, x.to(dtype))

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
        memory_format: torch.memory_format = torch.contiguous_format,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a collated batch of views.

        Args:
            global_views: (B, G, 3, Sg, Sg) uint8 global views.
            local_views: (B, N, 3, Sl, Sl) uint8 local views (N may be 0).
            photometric_params: (B, G+N, P) draws from :class:`MultiCropGeometry`; when ``None`` they are drawn
                here with :func:`sample_photometric_params` from ``generator``.
            generator: generator for the draws when ``photometric_params`` is ``None``.
            dtype: dtype of the outputs; the computation itself is float32 (autocast is disabled inside).
            memory_format: memory format of the outputs (``torch.channels_last`` for a channels-last model saves
                the caller a copy).

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
        # Non-blocking: a host-to-device copy from pageable memory is safe and does not wait for the device.
        photometric_params = photometric_params.to(device, non_blocking=True)
        out_format = {"dtype": dtype, "memory_format": memory_format}
        with torch.autocast(device_type=device.type, enabled=False):
            global_out = self._augment(
                global_views,
                photometric_params[:, :num_global],
                self.global_blur_p,
                self.global_solarize_p,
                **out_format,
            )
            local_out = self._augment(
                local_views,
                photometric_params[:, num_global:],
                (self.local_blur_p,) * num_local,
                (self.local_solarize_p,) * num_local,
                **out_format,
            )
        return global_out, local_out
