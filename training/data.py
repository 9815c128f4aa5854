"""Data sources and sampling for pretraining.

Sources: an image folder (the ImageNet ``train/`` layout or any nested folder; labels ignored), webdataset shards
(``wds:<urls>``, for data that does not fit one disk), and the built-in procedural generator (``procedural``).

Bad files in an image folder (truncated, empty, not an image, over the pixel limit) do not stop a run: a sample whose
file cannot be used takes the next usable file of the folder instead, deterministically, and reports how many files
it skipped; the loop collects these reports from every process into a :class:`Quarantine` listed in the run's
``output_dir`` and stops the run once too large a fraction of the folder is bad.

Every sample's augmentation randomness comes from one generator seeded by ``(seed, epoch, index)``
(:func:`sample_generator`), and the sampler is a pure function of ``(seed, step)``, so a resumed run sees exactly
the views an uninterrupted run sees, and a 2-process run splits each micro-batch of the 1-process run in two.
"""

from __future__ import annotations

import functools
import logging
import math
import signal
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from clove_timm.views import MultiCropGeometry, to_rgb
from training.config import BatchPlan

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_IMAGE_PIXELS = 89_478_485  # Pillow's Image.MAX_IMAGE_PIXELS (a 24-bit image of 256 MiB)
QUARANTINE_FILE = "quarantine.tsv"


class BadImageError(ValueError):
    """An image file that cannot be used: unreadable, truncated, over the pixel limit, or of an unconvertible mode.

    Attributes:
        path: the file.
        reason: what is wrong with it, without the path (one line).
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class BadDataError(RuntimeError):
    """More than the allowed fraction of an image folder's files are bad; the run stops instead of training on
    replacements."""


def derived_generator(purpose: str, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a purpose and non-negative integer keys (independent streams per purpose)."""
    entropy = (zlib.crc32(purpose.encode()), *keys)
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator that fixes every random choice of one sample in one epoch."""
    return derived_generator("sample", seed, epoch, index)


class ImageFolderSource:
    """All image files under a folder, recursively, in sorted order; hidden files and folders are skipped.

    Files whose suffix is not an image extension are not part of the data (a ``notes.txt`` beside the images is
    no bad image); hidden files (``.DS_Store``, macOS ``._*`` resource forks) and hidden folders are skipped too.

    Args:
        root: the folder (e.g. ImageNet's ``train/``).
        extensions: file suffixes taken as images (case-insensitive).
        max_pixels: largest accepted width * height. A file over it is refused from its header alone, before any
            pixel is decoded (a decompression bomb, e.g. a 20000 x 20000 1-bit PNG of a few hundred kB that
            decodes to 1.2 GB of RGB). Default: Pillow's own ``Image.MAX_IMAGE_PIXELS``, which Pillow only warns
            about; Pillow itself refuses twice that at open whatever this is set to.
    """

    def __init__(
        self,
        root: str | Path,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
        *,
        max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
        self.max_pixels = max_pixels
        suffixes = tuple(e.lower() for e in extensions)
        self.files = sorted(
            p
            for p in self.root.rglob("*")
            if p.suffix.lower() in suffixes
            and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(self.root).parts)
        )
        if not self.files:
            raise FileNotFoundError(f"no image files ({', '.join(suffixes)}) found under {self.root}")

    def __len__(self) -> int:
        return len(self.files)

    def relative_path(self, index: int) -> str:
        """The file of ``index`` relative to the root, with ``/`` separators."""
        return self.files[index].relative_to(self.root).as_posix()

    def load(self, index: int) -> Image.Image:
        """Decode one file to an RGB image (see :func:`clove_timm.views.to_rgb`).

        Raises:
            BadImageError: the file cannot be used; nothing of it was decoded when it is over ``max_pixels``.
        """
        path = self.files[index]
        try:
            with warnings.catch_warnings():
                # Pillow warns between 1x and 2x its limit; the explicit check below decides instead.
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(path) as image:
                    width, height = image.size
                    if width * height > self.max_pixels:
                        raise BadImageError(
                            path,
                            f"{width} x {height} = {width * height} pixels exceed the limit of {self.max_pixels} "
                            "(max_image_pixels); refused from the header, nothing decoded",
                        )
                    image.load()
                    return to_rgb(image)
        except BadImageError:
            raise
        except Exception as error:
            # Decoders of malformed files raise many types (OSError, SyntaxError, EOFError, struct.error,
            # zlib.error, IndexError, DecompressionBombError, ...); each one means this file cannot be used.
            reason = " ".join(f"{type(error).__name__}: {error}".split())
            raise BadImageError(path, reason) from error


class ProceduralSource:
    """The built-in procedural images (see :mod:`training.procedural`)."""

    def __init__(self, num_images: int, *, image_size: int, num_classes: int, seed: int) -> None:
        from training.procedural import ProceduralImages

        self.images = ProceduralImages(num_images, image_size=image_size, num_classes=num_classes, seed=seed)

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Image.Image:
        return self.images.image(index)


class MultiCropDataset(Dataset):
    """Map-style data set of multi-crop samples, indexed by ``(epoch, index)`` pairs from :class:`StepSampler`.

    A sample whose file the source refuses (:class:`BadImageError`) takes the next usable file in the source's
    order, wrapping around: index ``i`` uses file ``(i + k) % N`` for the smallest such ``k``. Its views still come
    from the generator of ``(seed, epoch, i)``, so the replacement is the same in every worker, process and run.
    The sample's ``skipped`` entry is ``k``: files ``i .. i + k - 1`` (mod N) are bad (see :class:`Quarantine`).

    Args:
        source: an object with ``__len__`` and ``load(index) -> PIL.Image``.
        geometry: the CPU geometry stage.
        seed: run seed.
    """

    def __init__(self, source: Any, geometry: MultiCropGeometry, seed: int) -> None:
        self.source = source
        self.geometry = geometry
        self.seed = seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, index = key
        size = len(self.source)
        for skipped in range(size):
            try:
                image = self.source.load((index + skipped) % size)
            except BadImageError as error:
                # Debug only: every epoch meets the same bad files; the loop reports each once.
                _logger.debug("sample %d: %s; trying the next file", index, error)
                continue
            sample = self.geometry(image, sample_generator(self.seed, epoch, index))
            sample["index"] = torch.tensor(index)
            sample["skipped"] = torch.tensor(skipped)
            return sample
        raise BadDataError(f"none of the {size} files of the data set can be used (sample {index} tried them all)")


class Quarantine:
    """The bad files of an image-folder run: found by the data workers, agreed on by every process, listed on disk.

    The samples of each step report how many files they skipped (see :class:`MultiCropDataset`); the loop gathers
    ``(index, skipped)`` from every process and passes them to :meth:`add`, so all processes hold the same set and
    take the same decision in :meth:`check`. The main process :meth:`write`s the list to ``path`` as
    ``<relative path>\t<reason>`` lines sorted by path: the file is the same whatever order workers and processes
    met the files in, in every run that reaches the same step, and after a resume (which starts from the list).

    Args:
        source: the image folder.
        path: the list's file (``<output_dir>/quarantine.tsv``).
        max_fraction: largest accepted fraction of bad files; above it :meth:`check` raises.
        load_existing: start from the files listed in ``path`` (a resumed run); names no longer in the folder are
            dropped.
    """

    def __init__(self, source: ImageFolderSource, path: Path, *, max_fraction: float, load_existing: bool) -> None:
        if not 0.0 <= max_fraction <= 1.0:
            raise ValueError(f"max_fraction must be in [0, 1], got {max_fraction}")
        self.source = source
        self.path = Path(path)
        self.max_fraction = max_fraction
        self.reasons: dict[int, str | None] = {}  # index -> reason; None until the main process asks the file
        if load_existing and self.path.is_file():
            by_name = {source.relative_path(i): i for i in range(len(source))}
            for line in self.path.read_text(encoding="utf-8").splitlines():
                if not line or line.startswith("#"):
                    continue
                name, _, reason = line.partition("\t")
                if name in by_name:
                    self.reasons[by_name[name]] = reason or None
                else:
                    _logger.warning("%s lists %s, which is no longer under %s; dropped", self.path, name, source.root)

    def __len__(self) -> int:
        return len(self.reasons)

    def indices(self) -> list[int]:
        """Indices of the bad files, in the source's (sorted path) order."""
        return sorted(self.reasons)

    def add(self, indices: Iterable[int], skipped: Iterable[int]) -> list[int]:
        """Record the files that samples skipped.

        Args:
            indices: sample indices ``i`` of a step, from every process.
            skipped: for each, the number ``k`` of files it skipped (files ``i .. i + k - 1`` mod N are bad).

        Returns:
            The indices not known before, sorted.
        """
        size = len(self.source)
        new = set()
        for index, count in zip(indices, skipped, strict=True):
            for offset in range(int(count)):
                bad = (int(index) + offset) % size
                if bad not in self.reasons:
                    new.add(bad)
        for bad in new:
            self.reasons[bad] = None
        return sorted(new)

    def _reason(self, index: int) -> str:
        if self.reasons[index] is None:
            try:
                self.source.load(index)
                self.reasons[index] = "failed in a data worker but reads now (a transient read error?)"
            except BadImageError as error:
                self.reasons[index] = error.reason
        return str(self.reasons[index])

    def write(self) -> None:
        """Rewrite the list atomically (main process only)."""
        lines = [f"# image files under {self.source.root} that could not be used: <path>\t<reason>, sorted by path"]
        lines += [f"{self.source.relative_path(i)}\t{self._reason(i)}" for i in self.indices()]
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        tmp.replace(self.path)

    def check(self, *, step: int | None = None) -> None:
        """Raise :class:`BadDataError` when more than ``max_fraction`` of the folder is bad (``step`` for the
        message)."""
        size = len(self.source)
        if len(self) > self.max_fraction * size:
            when = "" if step is None else f"at step {step}: "
            raise BadDataError(
                f"{when}{len(self)} of the {size} image files under {self.source.root} cannot be used "
                f"({len(self) / size:.2%}), more than max_bad_fraction={self.max_fraction:g}; they are listed in "
                f"{self.path}. Repair or remove them (or raise max_bad_fraction), then resume: the run stops "
                "rather than train on replacements of a damaged data set"
            )


def ignore_signals_in_worker(signal_names: Sequence[str], worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: ignore the preemption signals, which the training process handles.

    A scheduler that signals every process of a job reaches the workers too; without this they would die at once
    and the training process would fail on its next batch instead of finishing the step and checkpointing.
    """
    del worker_id
    for name in signal_names:
        signal.signal(signal.Signals[name], signal.SIG_IGN)


def worker_init(signal_names: Sequence[str]) -> functools.partial:
    """A picklable ``worker_init_fn`` for :func:`ignore_signals_in_worker`."""
    return functools.partial(ignore_signals_in_worker, tuple(signal_names))


class StepSampler(Sampler):
    """Yields this process's ``(epoch, index)`` keys, micro-batch after micro-batch, from a given optimizer step.

    Epoch ``e`` is a permutation of the data set seeded by ``(seed, e)``, padded by wrapping around to a whole
    number of global batches (``steps_per_epoch = ceil(N / global_batch)``; the padding repeats the first samples
    of the permutation, so every sample is seen once per epoch and a few twice). Optimizer step ``s`` takes the
    next ``global_batch`` keys, split into ``grad_accum_steps`` micro-batches of ``num_processes * per_device_batch``;
    process ``r`` takes slice ``r`` of each micro-batch. The sequence depends only on the seed, the data-set size
    and the batch plan, so it can start at any step (resume) without replaying the skipped ones.

    Args:
        num_samples: data-set size N.
        plan: the batch plan.
        rank: this process's index.
        seed: run seed.
        start_step: first optimizer step to produce.
        total_steps: step at which to stop.
    """

    def __init__(
        self, num_samples: int, plan: BatchPlan, *, rank: int, seed: int, start_step: int, total_steps: int
    ) -> None:
        if num_samples < 1:
            raise ValueError("the data set is empty")
        if not 0 <= rank < plan.num_processes:
            raise ValueError(f"rank {rank} is outside 0..{plan.num_processes - 1}")
        self.num_samples = num_samples
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.start_step = start_step
        self.total_steps = total_steps

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self.num_samples, self.plan.global_batch)

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """(steps_per_epoch * global_batch,) sample indices of one epoch, padded by wrapping around."""
        generator = derived_generator("epoch_order", self.seed, epoch)
        order = torch.randperm(self.num_samples, generator=generator)
        length = self.steps_per_epoch * self.plan.global_batch
        return order.repeat(math.ceil(length / self.num_samples))[:length]

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step) * self.plan.grad_accum_steps * self.plan.per_device_batch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        plan = self.plan
        micro = plan.num_processes * plan.per_device_batch
        mine = slice(self.rank * plan.per_device_batch, (self.rank + 1) * plan.per_device_batch)
        order, order_epoch = None, -1
        for step in range(self.start_step, self.total_steps):
            epoch, step_in_epoch = divmod(step, self.steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = self.epoch_order(epoch), epoch
            batch = order[step_in_epoch * plan.global_batch : (step_in_epoch + 1) * plan.global_batch]
            for m in range(plan.grad_accum_steps):
                for index in batch[m * micro : (m + 1) * micro][mine].tolist():
                    yield epoch, index


def steps_per_epoch(num_samples: int, global_batch: int) -> int:
    """Optimizer steps in one epoch (the last global batch padded)."""
    return math.ceil(num_samples / global_batch)


class WebDatasetSource(IterableDataset):
    """Multi-crop samples streamed from webdataset tar shards.

    Shards are shuffled per epoch with ``(seed, epoch)``, split over processes and then over DataLoader workers;
    each sample's views come from the generator of ``(seed, epoch, crc32(key))``. A stream has no random access,
    so a resumed run restarts the current epoch's shard order from its beginning (samples of that epoch already
    seen are seen again); an epoch is ``samples_per_epoch`` samples for the schedules. A record that fails to
    decode, or a damaged shard, is logged and skipped (webdataset's ``warn_and_continue``); a stream has no fixed
    index, so such records are not listed in a :class:`Quarantine` and every sample reports ``skipped = 0``.

    Args:
        urls: shard paths or URLs, brace patterns allowed (``/data/train-{0000..1023}.tar``).
        geometry: the CPU geometry stage.
        seed: run seed.
        rank: this process's index; ``world_size`` processes in all.
        start_epoch: epoch to start from.
    """

    def __init__(
        self, urls: str, geometry: MultiCropGeometry, *, seed: int, rank: int, world_size: int, start_epoch: int
    ) -> None:
        import braceexpand

        self.shards = [u for pattern in urls.split("::") for u in braceexpand.braceexpand(pattern)]
        if not self.shards:
            raise ValueError(f"no shards in {urls!r}")
        if len(self.shards) < world_size:
            raise ValueError(f"{len(self.shards)} shards cannot feed {world_size} processes; use more shards")
        self.geometry = geometry
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_epoch = start_epoch

    def _my_shards(self, epoch: int) -> list[str]:
        generator = derived_generator("shard_order", self.seed, epoch)
        order = [self.shards[i] for i in torch.randperm(len(self.shards), generator=generator).tolist()]
        mine = order[self.rank :: self.world_size]
        info = torch.utils.data.get_worker_info()
        return mine if info is None else mine[info.id :: info.num_workers]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        import webdataset as wds

        epoch = self.start_epoch
        while True:
            shards = self._my_shards(epoch)
            stream = wds.WebDataset(
                shards,
                shardshuffle=False,
                nodesplitter=None,
                workersplitter=None,
                empty_check=False,
                handler=wds.warn_and_continue,
            )
            for record in stream.decode("pil", handler=wds.warn_and_continue):
                image = next((record[k] for k in ("jpg", "jpeg", "png", "webp") if k in record), None)
                if image is None:
                    _logger.warning(
                        "sample %s in %s has no image entry; skipped", record.get("__key__"), record.get("__url__")
                    )
                    continue
                index = zlib.crc32(record["__key__"].encode())
                sample = self.geometry(image, sample_generator(self.seed, epoch, index))
                sample["index"] = torch.tensor(index)
                sample["skipped"] = torch.tensor(0)
                yield sample
            epoch += 1
