"""A built-in procedural image source: cluttered scenes of textured shapes with per-pixel labels.

The ``demo`` recipe pretrains on this source on a laptop-sized budget and scores the result with a frozen dense
linear probe (:mod:`training.probe`), so the data needs no download and no files. Every image is a function of
``(seed, index)`` alone: the same pair gives identical bytes in any process, on any machine, in any order.

A scene is a textured background with a few overlapping shapes (ellipses, rectangles, triangles, blobs) at random
positions, sizes and rotations. The class of a shape is its **texture** (stripes, checkerboard, dots, speckle, ...),
never its outline, colour or brightness: outlines are drawn independently of the class, and every instance gets its
own pair of random colours, contrast, brightness and texture phase/scale jitter. Class 0 is the background, whose
texture is smooth low-frequency clouds. So reading the class of a pixel needs the local texture around it, which is
what a dense probe of frozen features measures and what self-supervised learning of local features should help with.
Texture scales are fractions of the image side, so a scene looks the same at any ``image_size``.

Symbols used in this module:
    S: side of the square image in pixels (``image_size``).
    h, w: height and width of the bounding box of one shape, clipped to the image.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

__all__ = ["TEXTURE_NAMES", "ProceduralImages"]

_logger = logging.getLogger(__name__)

# Class k >= 1 is drawn with texture TEXTURE_NAMES[k - 1]; the order puts the most distinct textures first, so
# every ``num_classes`` gives a set of clearly different classes.
TEXTURE_NAMES: tuple[str, ...] = (
    "stripes",  # near-horizontal stripes (orientation 0 +- 15 degrees), flips keep them near-horizontal
    "checker",  # checkerboard at a random rotation
    "dots",  # lattice of round dots at a random rotation
    "speckle",  # blocky binary noise, about 2 px cells at S = 96
    "rings",  # concentric rings around the shape centre
    "grid",  # thin lines in two perpendicular directions at a random rotation
    "vertical_stripes",  # near-vertical stripes (orientation 90 +- 15 degrees)
    "coarse_stripes",  # wide stripes at any orientation
)

_SHAPES: tuple[str, ...] = ("ellipse", "rectangle", "triangle", "blob")


@dataclass(frozen=True)
class _TextureSpec:
    """Geometry of one texture class; lengths are fractions of the image side S."""

    period: float
    angle_deg: float | None  # orientation of the class (jittered by +- angle_jitter_deg); None: any orientation
    angle_jitter_deg: float = 15.0


_TEXTURE_SPECS: dict[str, _TextureSpec] = {
    "stripes": _TextureSpec(period=0.09, angle_deg=0.0),
    "checker": _TextureSpec(period=0.14, angle_deg=None),
    "dots": _TextureSpec(period=0.12, angle_deg=None),
    "speckle": _TextureSpec(period=0.022, angle_deg=None),
    "rings": _TextureSpec(period=0.10, angle_deg=None),
    "grid": _TextureSpec(period=0.16, angle_deg=None),
    "vertical_stripes": _TextureSpec(period=0.09, angle_deg=90.0),
    "coarse_stripes": _TextureSpec(period=0.20, angle_deg=None),
}

# Scene statistics (fractions of S where lengths).
_MIN_SHAPES, _MAX_SHAPES = 4, 8  # shapes per image, inclusive
_MIN_RADIUS, _MAX_RADIUS = 0.10, 0.30  # half-axes of a shape
_PERIOD_JITTER = 0.15  # texture period scaled by U(1 - j, 1 + j) per instance
_MIN_CONTRAST = 0.35  # smallest mean absolute difference between the two colours of a texture, before clipping
_CLOUD_GRID = 4  # background clouds: a CLOUD_GRID x CLOUD_GRID random field, bilinearly upsampled
_SENSOR_NOISE_STD = 0.02  # white noise added to every pixel (intensities in [0, 1])
_SQUARE_GAIN = 2.5  # sharpening of sinusoids into soft square waves: clip(0.5 + gain * sin, 0, 1)
_BACKGROUND_DRAWS = 3 + 3 * _CLOUD_GRID * _CLOUD_GRID + 3  # base colour, clouds, amplitude/angle/slope
_SHAPE_DRAWS = 26  # see ProceduralImages._draw_shape


def _soft_square(wave: np.ndarray) -> np.ndarray:
    """Soft square wave in [0, 1] from a sinusoid in [-1, 1]; soft edges keep small textures from aliasing."""
    return np.clip(0.5 + _SQUARE_GAIN * wave, 0.0, 1.0)


def _bilinear_matrix(out_size: int, in_size: int) -> np.ndarray:
    """(out_size, in_size) matrix that resamples a 1-D signal bilinearly (pixel centres, edges clamped)."""
    pos = np.clip((np.arange(out_size) + 0.5) * in_size / out_size - 0.5, 0.0, in_size - 1.0)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = (pos - lo).astype(np.float32)
    mat = np.zeros((out_size, in_size), dtype=np.float32)
    mat[np.arange(out_size), lo] += 1.0 - frac
    mat[np.arange(out_size), hi] += frac
    return mat


class ProceduralImages(torch.utils.data.Dataset):
    """Deterministic procedural scenes of textured shapes with per-pixel class labels.

    Args:
        num_images: number of images in the set.
        image_size: side S of the square images in pixels (default 96: small enough for CPU pretraining, large
            enough for several shapes per scene with textures a few pixels wide).
        num_classes: classes including the background (class 0); at most ``len(TEXTURE_NAMES) + 1``.
        seed: selects the set; sets with different seeds are independent draws (use another seed for held-out
            probe data). Must be >= 0.

    Raises:
        ValueError: on a non-positive ``num_images``, an ``image_size`` below 16, a ``num_classes`` outside
            ``[2, len(TEXTURE_NAMES) + 1]`` or a negative ``seed``.
    """

    def __init__(self, num_images: int, *, image_size: int = 96, num_classes: int = 5, seed: int = 0) -> None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        if not 2 <= num_classes <= len(TEXTURE_NAMES) + 1:
            raise ValueError(
                f"num_classes must be in [2, {len(TEXTURE_NAMES) + 1}] (background + one class per texture in "
                f"TEXTURE_NAMES), got {num_classes}"
            )
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.num_images = num_images
        self.image_size = image_size
        self.num_classes = num_classes
        self.seed = seed
        self.class_names: tuple[str, ...] = ("background", *TEXTURE_NAMES[: num_classes - 1])
        # Pixel-centre coordinates, shared by every image: (S, S) each.
        coords = np.arange(image_size, dtype=np.float32) + 0.5
        self._ys, self._xs = np.meshgrid(coords, coords, indexing="ij")
        self._ys_centred, self._xs_centred = self._ys - image_size / 2, self._xs - image_size / 2
        self._cloud_up = _bilinear_matrix(image_size, _CLOUD_GRID)

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> tuple[Image.Image, torch.Tensor]:
        """Image and labels of one scene.

        Returns:
            (image, labels): an RGB ``PIL.Image`` of size S x S and the (S, S) int64 class of every pixel.

        Raises:
            IndexError: if ``index`` is outside ``[-len, len)``.
        """
        pixels, labels = self.render(index)
        return Image.fromarray(pixels), torch.from_numpy(labels.astype(np.int64))

    def image(self, index: int) -> Image.Image:
        """The RGB image of one scene, without labels (for pretraining).

        Raises:
            IndexError: if ``index`` is outside ``[-len, len)``.
        """
        return Image.fromarray(self.render(index)[0])

    def labels(self, index: int) -> torch.Tensor:
        """The (S, S) int64 class map of one scene.

        Raises:
            IndexError: if ``index`` is outside ``[-len, len)``.
        """
        return torch.from_numpy(self.render(index)[1].astype(np.int64))

    def render(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw one scene as arrays.

        Args:
            index: item index; negative values count from the end, as for a list.

        Returns:
            (pixels, labels): (S, S, 3) uint8 RGB and (S, S) uint8 class map.

        Raises:
            IndexError: if ``index`` is outside ``[-len, len)``.
        """
        index = self._check_index(index)
        # One generator per (seed, index): items are independent of each other and of the order they are read in.
        # All draws come in four calls (small-array numpy calls, not pixels, dominate the cost of a 96 px scene).
        rng = np.random.default_rng([self.seed, index])
        num_shapes = int(rng.integers(_MIN_SHAPES, _MAX_SHAPES + 1))
        background_draws = rng.random(_BACKGROUND_DRAWS)
        shape_draws = rng.random((num_shapes, _SHAPE_DRAWS)).tolist()
        noise = rng.random((3, self.image_size, self.image_size), dtype=np.float32)

        canvas = self._background(background_draws)
        labels = np.zeros((self.image_size, self.image_size), dtype=np.uint8)
        for draws in shape_draws:
            self._draw_shape(draws, canvas, labels)
        # Uniform white noise of standard deviation _SENSOR_NOISE_STD: U(-0.5, 0.5) has variance 1/12.
        noise -= np.float32(0.5)
        noise *= np.float32(_SENSOR_NOISE_STD * math.sqrt(12.0))
        canvas += noise
        canvas *= np.float32(255.0)
        canvas += np.float32(0.5)
        pixels = np.clip(canvas, 0.0, 255.0, out=canvas).astype(np.uint8)
        # (3, S, S) -> (S, S, 3)
        return np.ascontiguousarray(pixels.transpose(1, 2, 0)), labels

    def _check_index(self, index: int) -> int:
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for ProceduralImages of length {self.num_images}")
        return index % self.num_images

    def _background(self, draws: np.ndarray) -> np.ndarray:
        """(3, S, S) float32 background from ``_BACKGROUND_DRAWS`` U(0, 1) draws: a random base colour, a linear
        gradient and smooth low-frequency clouds (no structure at the scale of the object textures)."""
        grid = _CLOUD_GRID
        base = (0.15 + 0.7 * draws[0:3]).astype(np.float32)
        clouds = (draws[3 : 3 + 3 * grid * grid] - 0.5).astype(np.float32).reshape(3, grid, grid)
        amplitude, angle, slope = draws[3 + 3 * grid * grid :].tolist()
        amplitude = 0.2 + 0.3 * amplitude
        angle *= 2.0 * math.pi
        slope *= 0.3 / self.image_size
        # (3, g, g) -> (3, S, S): separable bilinear upsampling as two matrix products.
        clouds = self._cloud_up @ clouds @ self._cloud_up.T
        clouds *= np.float32(amplitude)
        clouds += (slope * math.cos(angle)) * self._xs_centred + (slope * math.sin(angle)) * self._ys_centred
        clouds += base[:, None, None]
        return clouds

    def _draw_shape(self, draws: list[float], canvas: np.ndarray, labels: np.ndarray) -> None:
        """Paint one textured shape over ``canvas`` (3, S, S) and write its class into ``labels`` (S, S).

        ``draws`` holds the ``_SHAPE_DRAWS`` U(0, 1) draws of the shape, used in the order below.
        """
        size = self.image_size
        cls = 1 + min(int(draws[0] * (self.num_classes - 1)), self.num_classes - 2)
        shape = _SHAPES[min(int(draws[1] * len(_SHAPES)), len(_SHAPES) - 1)]
        cx, cy = draws[2] * size, draws[3] * size
        rx = (_MIN_RADIUS + (_MAX_RADIUS - _MIN_RADIUS) * draws[4]) * size
        ry = (_MIN_RADIUS + (_MAX_RADIUS - _MIN_RADIUS) * draws[5]) * size
        rotation = math.pi * draws[6]
        colours = _texture_colours(draws[7:15])
        texture_draws = draws[15:19]
        texture_seed = int(draws[19] * 2**53)  # seeds textures with random content (speckle)
        outline_draws = draws[20:26]  # blob harmonics or triangle vertex jitter

        reach = _outline_reach(shape, rx, ry, outline_draws)
        y0, y1 = max(0, math.floor(cy - reach)), min(size, math.ceil(cy + reach))
        x0, x1 = max(0, math.floor(cx - reach)), min(size, math.ceil(cx + reach))
        if y0 >= y1 or x0 >= x1:
            return
        # Offsets from the shape centre inside the clipped bounding box: (h, w) each.
        dx = self._xs[y0:y1, x0:x1] - cx
        dy = self._ys[y0:y1, x0:x1] - cy
        mask = _outline_mask(shape, dx, dy, rx, ry, rotation, outline_draws)
        pattern = self._texture(TEXTURE_NAMES[cls - 1], dx, dy, texture_draws, texture_seed)
        # (h, w) pattern in [0, 1] mixes the two instance colours: (3, h, w).
        painted = colours[0][:, None, None] + pattern * (colours[1] - colours[0])[:, None, None]
        np.copyto(canvas[:, y0:y1, x0:x1], painted, where=mask)
        np.copyto(labels[y0:y1, x0:x1], np.uint8(cls), where=mask)

    def _texture(self, name: str, dx: np.ndarray, dy: np.ndarray, draws: list[float], seed: int) -> np.ndarray:
        """(h, w) float32 texture pattern in [0, 1] at offsets ``dx``, ``dy`` (h, w) from the shape centre.

        ``draws`` holds 4 U(0, 1) draws of the instance: period jitter, orientation, and two phases; ``seed``
        seeds the random content of noise textures.
        """
        spec = _TEXTURE_SPECS[name]
        period = spec.period * self.image_size * (1.0 + _PERIOD_JITTER * (2.0 * draws[0] - 1.0))
        if spec.angle_deg is None:
            angle = math.pi * draws[1]
        else:
            angle = math.radians(spec.angle_deg + spec.angle_jitter_deg * (2.0 * draws[1] - 1.0))
        phase_u, phase_v = draws[2], draws[3]  # fractions of a period
        cos_a, sin_a = math.cos(angle) / period, math.sin(angle) / period
        two_pi = 2.0 * math.pi
        if name in ("stripes", "vertical_stripes", "coarse_stripes"):
            # Stripes run along the texture orientation, so the intensity varies across it.
            v = cos_a * dy - sin_a * dx
            return _soft_square(np.sin(two_pi * (v + phase_v)))
        if name == "speckle":
            # Blocky binary noise: one random bit per cell of about `period` pixels, aligned with the image grid.
            cell = max(1, round(period))
            h, w = dx.shape
            bits = np.random.default_rng(seed).random((-(-h // cell), -(-w // cell)), dtype=np.float32) < 0.5
            return np.repeat(np.repeat(bits.astype(np.float32), cell, axis=0), cell, axis=1)[:h, :w]
        if name == "rings":
            return _soft_square(np.sin(two_pi * (np.sqrt(dx * dx + dy * dy) / period + phase_u)))
        # Texture coordinates in periods: u along the texture orientation, v across it.
        u = cos_a * dx + sin_a * dy + phase_u
        v = cos_a * dy - sin_a * dx + phase_v
        if name == "checker":
            return _soft_square(np.sin(two_pi * u) * np.sin(two_pi * v))
        # Offsets (in periods) from the nearest lattice point.
        u -= np.round(u)
        v -= np.round(v)
        if name == "dots":
            # Dots of radius 0.3 periods with soft edges 0.05 periods wide.
            return np.clip((0.3 - np.sqrt(u * u + v * v)) * 20.0 + 0.5, 0.0, 1.0)
        if name == "grid":
            # Lines 0.18 periods wide in both directions, soft edges 0.04 periods wide.
            return np.clip((0.09 - np.minimum(np.abs(u), np.abs(v))) * 25.0 + 0.5, 0.0, 1.0)
        raise AssertionError(f"unknown texture {name!r}")


def _texture_colours(draws: list[float]) -> np.ndarray:
    """(2, 3) float32 colours of one instance from 8 U(0, 1) draws.

    The second colour is the first moved by a random contrast in [_MIN_CONTRAST, 0.7] (mean absolute difference
    over channels) in a random direction; channels that would leave [0, 1] move the other way, then clip. A
    random brightness in [0.7, 1.1] scales both.
    """
    first = draws[0:3]
    direction = [2.0 * d - 1.0 for d in draws[3:6]]
    norm = max(sum(abs(d) for d in direction) / 3.0, 1e-6)
    contrast = _MIN_CONTRAST + (0.7 - _MIN_CONTRAST) * draws[6]
    brightness = 0.7 + 0.4 * draws[7]
    second = []
    for f, d in zip(first, direction, strict=True):
        step = contrast * d / norm
        value = f + step if 0.0 <= f + step <= 1.0 else f - step
        second.append(min(max(value, 0.0), 1.0))
    return np.array([first, second], dtype=np.float32) * np.float32(brightness)


def _outline_reach(shape: str, rx: float, ry: float, draws: list[float]) -> float:
    """Largest distance in pixels from the centre of a shape to its outline (arguments as for _outline_mask)."""
    if shape == "rectangle":
        return math.hypot(rx, ry)
    if shape == "blob":
        return 0.5 * (rx + ry) * math.prod(1.0 + 0.36 * abs(d - 0.5) for d in draws[0:3])
    return max(rx, ry)


def _outline_mask(
    shape: str, dx: np.ndarray, dy: np.ndarray, rx: float, ry: float, rotation: float, draws: list[float]
) -> np.ndarray:
    """(h, w) bool mask of one shape outline at offsets ``dx``, ``dy`` (h, w) from its centre.

    Args:
        shape: one of ``_SHAPES``.
        rx, ry: half-axes in pixels along and across ``rotation`` (radians).
        draws: 6 U(0, 1) draws: blob harmonic amplitudes and phases, or triangle vertex angle jitter.
    """
    cos_r, sin_r = math.cos(rotation), math.sin(rotation)
    if shape == "triangle":
        angles = [rotation + 2.0 * math.pi * i / 3 + 0.8 * (draws[i] - 0.5) for i in range(3)]
        vx = [rx * math.cos(a) for a in angles]
        vy = [ry * math.sin(a) for a in angles]
        # Inside when the point is on the same side of all three edges (signs of the edge cross products).
        sides = [(vx[(i + 1) % 3] - vx[i]) * (dy - vy[i]) - (vy[(i + 1) % 3] - vy[i]) * (dx - vx[i]) for i in range(3)]
        return ((sides[0] >= 0) & (sides[1] >= 0) & (sides[2] >= 0)) | (
            (sides[0] <= 0) & (sides[1] <= 0) & (sides[2] <= 0)
        )
    along = cos_r * dx + sin_r * dy
    across = cos_r * dy - sin_r * dx
    if shape == "ellipse":
        along *= 1.0 / rx
        across *= 1.0 / ry
        return along * along + across * across <= 1.0
    if shape == "rectangle":
        return (np.abs(along) <= rx) & (np.abs(across) <= ry)
    if shape == "blob":
        # A radius that varies smoothly with the polar angle: harmonics k = 2, 3, 4 of amplitude up to 0.18.
        theta = np.arctan2(across, along)
        radius = np.float32(0.5 * (rx + ry))
        for k in range(2, 5):
            amplitude = 0.36 * (draws[k - 2] - 0.5)
            radius = radius * (1.0 + amplitude * np.cos(k * theta + 2.0 * math.pi * draws[k + 1]))
        return along * along + across * across <= radius * radius
    raise AssertionError(f"unknown shape {shape!r}")
