"""Tests of the procedural image source: determinism, label maps, class coverage, and texture as the class cue."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from training.procedural import TEXTURE_NAMES, ProceduralImages


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


def _collate_pixels(items: list[tuple[Image.Image, torch.Tensor]]) -> list[np.ndarray]:
    return [_pixels(image) for image, _ in items]


def test_same_seed_and_index_give_identical_bytes_across_objects_and_access_order():
    first = ProceduralImages(50, seed=3)
    second = ProceduralImages(50, seed=3)
    # The second object reads in reverse order, so any state carried between items would show.
    second_items = {i: second[i] for i in reversed(range(10))}
    for i in range(10):
        image, labels = first[i]
        assert image.tobytes() == second_items[i][0].tobytes()
        assert torch.equal(labels, second_items[i][1])
    assert first.image(7).tobytes() == first[7][0].tobytes()
    assert torch.equal(first.labels(7), first[7][1])


def test_different_seeds_and_indices_differ():
    a, b = ProceduralImages(8, seed=0), ProceduralImages(8, seed=1)
    for i in range(8):
        assert a.image(i).tobytes() != b.image(i).tobytes()
        assert not torch.equal(a.labels(i), b.labels(i))
    assert a.image(0).tobytes() != a.image(1).tobytes()


@pytest.mark.parametrize("image_size", [32, 64, 96])
def test_image_and_label_format(image_size):
    dataset = ProceduralImages(4, image_size=image_size, num_classes=4)
    image, labels = dataset[2]
    assert isinstance(image, Image.Image)
    assert image.mode == "RGB"
    assert image.size == (image_size, image_size)
    assert labels.shape == (image_size, image_size)
    assert labels.dtype == torch.int64
    assert int(labels.min()) >= 0
    assert int(labels.max()) < 4
    assert len(dataset) == 4
    assert dataset.class_names == ("background", *TEXTURE_NAMES[:3])


@pytest.mark.parametrize("num_classes", [2, 5, len(TEXTURE_NAMES) + 1])
def test_every_class_appears_in_a_small_set(num_classes):
    dataset = ProceduralImages(16, num_classes=num_classes, seed=11)
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for i in range(len(dataset)):
        counts += torch.bincount(dataset.labels(i).flatten(), minlength=num_classes)
    assert counts.numel() == num_classes  # no label at or above num_classes
    assert bool((counts > 0).all()), counts


def test_class_balance_leaves_every_object_class_a_fair_share():
    dataset = ProceduralImages(64, num_classes=5, seed=2)
    counts = torch.zeros(5, dtype=torch.float64)
    for i in range(len(dataset)):
        counts += torch.bincount(dataset.labels(i).flatten(), minlength=5)
    share = counts / counts.sum()
    assert 0.3 < share[0] < 0.75  # background: a cluttered scene, not an empty one
    assert bool((share[1:] > 0.05).all()), share


def _gradients_by_class(dataset: ProceduralImages, count: int) -> dict[int, tuple[float, float]]:
    """Mean absolute luminance difference (vertical, horizontal) between neighbours of the same class."""
    sums = {k: np.zeros(4) for k in range(dataset.num_classes)}
    for i in range(count):
        pixels, labels = dataset.render(i)
        luma = pixels.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        vertical = (labels[1:, :] == labels[:-1, :]), np.abs(luma[1:, :] - luma[:-1, :]), labels[1:, :]
        horizontal = (labels[:, 1:] == labels[:, :-1]), np.abs(luma[:, 1:] - luma[:, :-1]), labels[:, 1:]
        for k in sums:
            for j, (same, diff, lab) in enumerate((vertical, horizontal)):
                keep = same & (lab == k)
                sums[k][2 * j] += diff[keep].sum()
                sums[k][2 * j + 1] += keep.sum()
    return {k: (s[0] / s[1], s[2] / s[3]) for k, s in sums.items()}


def test_texture_defines_the_class():
    dataset = ProceduralImages(32, num_classes=len(TEXTURE_NAMES) + 1, seed=5)
    grads = _gradients_by_class(dataset, 32)
    names = dataset.class_names
    stripes, vertical_stripes = names.index("stripes"), names.index("vertical_stripes")
    # Near-horizontal stripes vary down the image, near-vertical ones across it.
    assert grads[stripes][0] > 2.0 * grads[stripes][1]
    assert grads[vertical_stripes][1] > 2.0 * grads[vertical_stripes][0]
    # The background is smooth (its neighbour differences are the sensor noise alone): every texture, even sparse
    # dots, adds clearly more local contrast.
    background = sum(grads[0]) / 2
    assert all(sum(grads[k]) / 2 > 1.5 * background for k in range(1, dataset.num_classes)), grads


def test_colour_alone_does_not_give_the_class():
    dataset = ProceduralImages(64, num_classes=5, seed=7)
    scenes = [dataset.render(i) for i in range(len(dataset))]
    # (classes, RGB) mean colour of each object class
    means = np.stack([np.concatenate([p[lab == k] for p, lab in scenes]).mean(axis=0) for k in range(1, 5)])
    # Per-instance random colours: the class-mean colours all sit near mid-grey and close to each other.
    assert np.ptp(means, axis=0).max() < 25.0, means


def test_negative_index_counts_from_the_end():
    dataset = ProceduralImages(5)
    assert dataset.image(-1).tobytes() == dataset.image(4).tobytes()


@pytest.mark.parametrize("index", [5, -6, 100])
def test_out_of_range_index_names_index_and_length(index):
    dataset = ProceduralImages(5)
    with pytest.raises(IndexError, match=rf"index {index} out of range .* length 5"):
        dataset[index]
    with pytest.raises(IndexError, match=str(index)):
        dataset.image(index)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_images=0), "num_images"),
        (dict(num_images=4, image_size=8), "image_size"),
        (dict(num_images=4, num_classes=1), "num_classes"),
        (dict(num_images=4, num_classes=len(TEXTURE_NAMES) + 2), "num_classes"),
        (dict(num_images=4, seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProceduralImages(**kwargs)


def test_works_with_a_dataloader_and_workers_see_the_same_items():
    dataset = ProceduralImages(6, image_size=32, seed=4)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=_collate_pixels)
    from_workers = [image for batch in loader for image in batch]
    assert all(np.array_equal(a, _pixels(dataset.image(i))) for i, a in enumerate(from_workers))
