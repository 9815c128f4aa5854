"""Data sources and sampling for pretraining.

Sources: an image folder (the ImageNet ``train/`` layout or any nested folder; labels ignored), webdataset shards
(``wds:<urls>``, for data that does not fit one disk), and the built-in procedural generator (``procedural``).

Every sample's augmentation randomness comes from one generator seeded by ``(seed, epoch, index)``
(:func:`sample_generator`), and the sampler is a pure function of ``(seed, step)``, so a resumed run sees exactly
the views an uninterrupted run sees, and a 2-process run splits each micro-batch of the 1-process run in two.
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler

from clove_timm.views import MultiCropGeometry
from training.config import BatchPlan

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


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

    Args:
        root: the folder (e.g. ImageNet's ``train/``).
        extensions: file suffixes taken as images (case-insensitive).
    """

    def __init__(self, root: str | Path, extensions: Sequence[str] = IMAGE_EXTENSIONS) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a folder")
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

    def load(self, index: int) -> Image.Image:
        with Image.open(self.files[index]) as image:
            image.load()
            return image


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
        sample = self.geometry(self.source.load(index), sample_generator(self.seed, epoch, index))
        sample["index"] = torch.tensor(index)
        return sample


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
    seen are seen again); an epoch is ``samples_per_epoch`` samples for the schedules.

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
                shards, shardshuffle=False, nodesplitter=None, workersplitter=None, empty_check=False
            )
            for record in stream.decode("pil"):
                image = next((record[k] for k in ("jpg", "jpeg", "png", "webp") if k in record), None)
                if image is None:
                    _logger.warning(
                        "sample %s in %s has no image entry; skipped", record.get("__key__"), record.get("__url__")
                    )
                    continue
                index = zlib.crc32(record["__key__"].encode())
                sample = self.geometry(image, sample_generator(self.seed, epoch, index))
                sample["index"] = torch.tensor(index)
                yield sample
            epoch += 1
