"""A generated image folder with every kind of bad and odd file a crawled data set holds (used by the tests).

What is bad and what is only odd is decided here, by construction, not by the code under test:

* bad (cannot be used): JPEGs truncated to 50/90/99 % of their bytes, a zero-byte file, text saved as ``.jpg``,
  and two decompression bombs: 1-bit PNGs of 10000 x 10000 (over the default ``max_image_pixels``, under
  Pillow's own refusal limit) and 20000 x 20000 (over both), each a few kB on disk;
* odd but good: CMYK and grayscale JPEGs, a palette PNG with a transparent index, an RGBA PNG, a 16-bit grayscale
  PNG, and 1 x 1, 1 x 500 and 500 x 1 images;
* not data: a text file, a JPEG with a ``.dat`` extension, hidden files (``.DS_Store``, a macOS ``._`` resource
  fork with junk bytes, a hidden folder), and an empty class folder.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

# colours of the transparency fixtures, and the background the loader must composite them on (ImageNet mean)
OPAQUE_COLOUR = (30, 200, 60)
HIDDEN_COLOUR = (250, 0, 250)  # stored under alpha 0: must never reach a view
BACKGROUND = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406))
SIXTEEN_BIT_VALUES = (0, 32896, 65535)  # -> 0, 128, 255 when rescaled by 257; clipping would give 0, 255, 255


@dataclass(frozen=True)
class BadFolder:
    """The generated folder and what each file is, as relative paths."""

    root: Path
    good: tuple[str, ...]
    bad: tuple[str, ...]
    not_data: tuple[str, ...]

    @property
    def images(self) -> list[str]:
        """Every file the image folder should list, in its sorted order."""
        return sorted(self.good + self.bad)


def _jpeg(array: np.ndarray, mode: str | None = None, quality: int = 90) -> bytes:
    image = Image.fromarray(array)
    if mode is not None:
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _png(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


def one_bit_png_bomb(side: int) -> bytes:
    """A valid 1-bit grayscale PNG of ``side x side`` black pixels, written chunk by chunk (never held decoded)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # bit depth 1, grayscale
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_block = 1000
    data = b"".join(compressor.compress(row * min(rows_per_block, side - r)) for r in range(0, side, rows_per_block))
    data += compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def make_bad_image_folder(root: Path, *, num_plain: int = 10) -> BadFolder:
    """Write the folder under ``root`` (created) and return what is in it."""
    rng = np.random.default_rng(0)
    files: dict[str, bytes] = {}
    good, bad, not_data = [], [], []

    def add(kind: list[str], name: str, data: bytes) -> None:
        files[name] = data
        kind.append(name)

    # Names place bad files between good ones, three in a row (class_a/img_09t, the two bombs), and last of all
    # (class_z), so that a replacement has to skip several files and to wrap around to the first one.
    for i in range(num_plain):
        height, width = int(rng.integers(24, 64)), int(rng.integers(24, 64))
        add(good, f"class_a/img_{i:02d}.jpg", _jpeg(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)))
    photo = _jpeg(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    for i, percent in zip((3, 6, 9), (50, 90, 99), strict=True):
        add(bad, f"class_a/img_{i:02d}t.jpg", photo[: len(photo) * percent // 100])  # truncated
    add(bad, "class_b/bomb_100mp.png", one_bit_png_bomb(10_000))
    add(bad, "class_b/bomb_400mp.png", one_bit_png_bomb(20_000))
    add(bad, "class_z/text.jpg", b"this is a text file, not an image\n" * 4)
    add(bad, "class_z/zero_bytes.jpg", b"")

    gradient = np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))
    add(good, "class_b/cmyk.jpg", _jpeg(np.stack([gradient, 255 - gradient, gradient // 2], axis=-1), mode="CMYK"))
    add(good, "class_b/gray.jpg", _jpeg(gradient))
    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([*HIDDEN_COLOUR, *OPAQUE_COLOUR] + [0] * 762)
    palette.paste(1, (10, 0, 20, 10))  # left half index 0 (transparent), right half index 1 (opaque)
    add(good, "class_b/palette_transparent.png", _png(palette, transparency=0))
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)
    rgba[:, :10] = (*HIDDEN_COLOUR, 0)
    rgba[:, 10:] = (*OPAQUE_COLOUR, 255)
    add(good, "class_b/rgba.png", _png(Image.fromarray(rgba)))
    sixteen = np.repeat(np.array([SIXTEEN_BIT_VALUES], dtype=np.uint16), 12, axis=1).repeat(12, axis=0)
    add(good, "class_b/sixteen_bit.png", _png(Image.fromarray(sixteen)))
    for name, (height, width) in {"one_pixel": (1, 1), "one_row": (1, 500), "one_column": (500, 1)}.items():
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        add(good, f"class_b/{name}.png", _png(Image.fromarray(pixels)))

    add(not_data, "class_a/readme.txt", b"notes about the data\n")
    add(not_data, "class_a/photo.dat", photo)
    add(not_data, "class_a/.DS_Store", b"\x00\x00\x00\x01Bud1")
    add(not_data, "class_a/._img_00.jpg", b"\x00\x05\x16\x07junk resource fork")
    add(not_data, ".cache/thumb.jpg", photo)

    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "class_empty").mkdir(parents=True, exist_ok=True)
    return BadFolder(root, tuple(good), tuple(bad), tuple(not_data))
