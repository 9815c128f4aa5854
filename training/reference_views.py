"""The reference's all-PIL multi-crop pipeline, rebuilt for the benchmark and the distribution tests.

The CLoVE reference (sthalles/CLoVE, ``contrast/data/transform.py`` with ``aug_type='BYOL'``,
``contrast/data/transform_coord.py`` and ``contrast/data/dataset.py``) makes every view of an image with one chain
of torchvision v1 transforms on PIL images: the first global view with ``transform_1``, the second with
``transform_2``, and each of the six local views with ``transform_3``. Per view:

1. RandomResizedCrop with the crop box (Python ``random`` draws, ``F.resized_crop`` bicubic);
2. horizontal flip (``random.random() < p``), which swaps ``x_ul`` and ``x_lr`` of the box;
3. ``RandomApply([ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8)``;
4. ``RandomGrayscale(p=0.2)``;
5. ``RandomApply([GaussianBlur], p)`` with ``ImageFilter.GaussianBlur(radius=sigma)``, sigma drawn with NumPy;
6. ``RandomApply([ImageOps.solarize], p)`` (second global view only);
7. ``ToTensor`` and ``Normalize`` with the ImageNet mean and std.

Randomness comes from the same global generators the reference uses (Python's ``random``, torch's and NumPy's);
seed all three for repeatable views. This module is a measuring stick for :mod:`clove_timm.views`, not a training
path: the split pipeline there is what the recipe runs.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter, ImageOps
from torchvision import transforms
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from clove_timm.views import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["ReferenceMultiCrop", "reference_crop_params"]


def reference_crop_params(
    height: int, width: int, *, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
    """A RandomResizedCrop window drawn as the reference's ``RandomResizedCropCoord.get_params`` draws it.

    Up to 10 tries of an area fraction ``random.uniform(*scale)`` and an aspect ratio ``exp(random.uniform(log
    ratio))`` in double precision; the first window that fits is placed with ``random.randint``; otherwise the
    central crop clipped to ``ratio``.

    Args:
        height: image height H.
        width: image width W.
        scale: (min, max) fraction of the image area.
        ratio: (min, max) aspect ratio w / h.

    Returns:
        ``(i, j, h, w)``: top row, left column, height and width of the crop.
    """
    area = height * width
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = random.uniform(*scale) * area
        aspect = math.exp(random.uniform(log_low, log_high))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            return random.randint(0, height - h), random.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        w, h = round(height * max(ratio)), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class _PilGaussianBlur:
    """The reference's ``GaussianBlur``: PIL's Gaussian blur with a radius (standard deviation) drawn per call."""

    def __init__(self, sigma: tuple[float, float]) -> None:
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        # NumPy's global generator on purpose: the reference draws sigma from it.
        return image.filter(ImageFilter.GaussianBlur(radius=np.random.uniform(*self.sigma)))  # noqa: NPY002


class ReferenceMultiCrop:
    """The reference's view chain for one image, with the reference's settings as defaults.

    The settings mirror :class:`clove_timm.views.MultiCropGeometry` and :class:`clove_timm.views.MultiCropPhotometric`
    so the two pipelines can be compared op by op (a test turns all but one op off in both).

    Args:
        global_size: side of a global view (reference 224).
        local_size: side of a local view (reference 96).
        num_local: local views per image (reference 6).
        global_scale: crop area range of the global views (reference ``--crop 0.2``, up to 1).
        local_scale: crop area range of the local views (reference (0.08, 0.3)).
        ratio: crop aspect-ratio range.
        flip_p: horizontal flip probability.
        jitter_p: probability of the colour jitter.
        brightness: ``ColorJitter`` brightness.
        contrast: ``ColorJitter`` contrast.
        saturation: ``ColorJitter`` saturation.
        hue: ``ColorJitter`` hue.
        grayscale_p: ``RandomGrayscale`` probability.
        blur_sigma: range of the blur radius.
        global_blur_p: blur probability of each global view (its length is the number of global views).
        local_blur_p: blur probability of the local views.
        global_solarize_p: solarize probability of each global view.
        local_solarize_p: solarize probability of the local views.
        normalize: apply ``Normalize`` (ImageNet mean and std) after ``ToTensor``.
        interpolation: resampling of the crops (the reference: bicubic; tests that need only the boxes use nearest).
    """

    def __init__(
        self,
        *,
        global_size: int = 224,
        local_size: int = 96,
        num_local: int = 6,
        global_scale: tuple[float, float] = (0.2, 1.0),
        local_scale: tuple[float, float] = (0.08, 0.3),
        ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0),
        flip_p: float = 0.5,
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
        normalize: bool = True,
        interpolation: InterpolationMode = InterpolationMode.BICUBIC,
    ) -> None:
        if len(global_blur_p) != len(global_solarize_p) or not global_blur_p:
            raise ValueError("global_blur_p and global_solarize_p need one probability per global view")
        self.global_size = global_size
        self.local_size = local_size
        self.num_local = num_local
        self.global_scale = global_scale
        self.local_scale = local_scale
        self.ratio = ratio
        self.flip_p = flip_p
        self.jitter = transforms.RandomApply(
            [transforms.ColorJitter(brightness, contrast, saturation, hue)], p=jitter_p
        )
        self.grayscale = transforms.RandomGrayscale(p=grayscale_p)
        self.blur = _PilGaussianBlur(blur_sigma)
        self.global_blur_p = tuple(global_blur_p)
        self.local_blur_p = local_blur_p
        self.global_solarize_p = tuple(global_solarize_p)
        self.local_solarize_p = local_solarize_p
        self.normalize = normalize
        self.interpolation = interpolation

    @property
    def num_global(self) -> int:
        """Number of global views."""
        return len(self.global_blur_p)

    def crop(self, image: Image.Image, size: int, scale: tuple[float, float]) -> tuple[Image.Image, torch.Tensor]:
        """Steps 1-2: crop, resize and flip; returns the view and its (4,) box ``(x_ul, y_ul, x_lr, y_lr)``."""
        width, height = image.size
        i, j, h, w = reference_crop_params(height, width, scale=scale, ratio=self.ratio)
        box = torch.tensor([j / (width - 1), i / (height - 1), (j + w - 1) / (width - 1), (i + h - 1) / (height - 1)])
        view = TF.resized_crop(image, i, j, h, w, [size, size], self.interpolation)
        if random.random() < self.flip_p:
            view = TF.hflip(view)
            box = box[[2, 1, 0, 3]]
        return view, box

    def photometric(self, view: Image.Image, blur_p: float, solarize_p: float) -> Image.Image:
        """Steps 3-6 on a PIL view; ``RandomApply`` semantics (applied when ``torch.rand(1) < p``)."""
        view = self.grayscale(self.jitter(view))
        if torch.rand(1).item() < blur_p:
            view = self.blur(view)
        if torch.rand(1).item() < solarize_p:
            view = ImageOps.solarize(view)
        return view

    def to_tensor(self, view: Image.Image) -> torch.Tensor:
        """Step 7: (3, S, S) float32, normalized when ``normalize``."""
        tensor = TF.to_tensor(view)
        return TF.normalize(tensor, IMAGENET_MEAN, IMAGENET_STD) if self.normalize else tensor

    def __call__(self, image: Image.Image) -> dict[str, torch.Tensor]:
        """All views of one RGB image, in the reference's order (globals, then locals).

        Returns:
            ``global_views`` (G, 3, Sg, Sg) and ``local_views`` (N, 3, Sl, Sl) float32, ``boxes`` (G+N, 4).
        """
        views, boxes = [], []
        settings = [
            (self.global_size, self.global_scale, b, s)
            for b, s in zip(self.global_blur_p, self.global_solarize_p, strict=True)
        ]
        settings += [(self.local_size, self.local_scale, self.local_blur_p, self.local_solarize_p)] * self.num_local
        for size, scale, blur_p, solarize_p in settings:
            view, box = self.crop(image, size, scale)
            views.append(self.to_tensor(self.photometric(view, blur_p, solarize_p)))
            boxes.append(box)
        num_global = self.num_global
        local_views = (
            torch.stack(views[num_global:]) if self.num_local else torch.empty(0, 3, self.local_size, self.local_size)
        )
        return {
            "global_views": torch.stack(views[:num_global]),
            "local_views": local_views,
            "boxes": torch.stack(boxes),
        }
