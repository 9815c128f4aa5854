"""Tests of the frozen dense linear probe: separable and random labels, determinism, timm backbones, scoring."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn

from training.probe import _segmentation_scores, dense_linear_probe, extract_dense_features, format_probe_table
from training.procedural import ProceduralImages

NUM_CLASSES = 4


class _ColourCodedScenes(torch.utils.data.Dataset):
    """Blocky random label maps whose red channel encodes the class: red = 60 * class (uint8 images)."""

    def __init__(self, count: int, *, size: int = 32, block: int = 8, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        coarse = torch.randint(0, NUM_CLASSES, (count, size // block, size // block), generator=generator)
        self.labels = coarse.repeat_interleave(block, dim=1).repeat_interleave(block, dim=2)
        self.noise = torch.randint(0, 256, (count, 2, size, size), generator=generator, dtype=torch.uint8)
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        red = (self.labels[index] * 60).to(torch.uint8)[None]
        return torch.cat([red, self.noise[index]]), self.labels[index]


class _LabelReadingBackbone(nn.Module):
    """A fixed "backbone" whose stride-1 features are the one-hot class read back from the red channel."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # Undo the ImageNet normalization of the probe, then red in [0, 1] -> class index.
        red = x[:, 0] * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]
        classes = torch.round(red * 255.0 / 60.0).long().clamp(0, NUM_CLASSES - 1)
        # (B, H, W) -> (B, K, H, W)
        return nn.functional.one_hot(classes, NUM_CLASSES).permute(0, 3, 1, 2).float()


class _RandomLabels(torch.utils.data.Dataset):
    """Procedural images with per-pixel labels drawn independently of the image."""

    def __init__(self, count: int, *, size: int, seed: int) -> None:
        self.images = ProceduralImages(count, image_size=size, seed=seed)
        self.labels = torch.randint(0, NUM_CLASSES, (count, size, size), generator=torch.Generator().manual_seed(seed))
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.images.image(index), self.labels[index]


def _probe(backbone, train_set, test_set, **kwargs):
    settings = dict(image_size=32, epochs=30, batch_size=16, lr=0.05)
    return dense_linear_probe(backbone, train_set, test_set, **{**settings, **kwargs})


def test_separable_features_give_perfect_scores():
    metrics = _probe(_LabelReadingBackbone(), _ColourCodedScenes(32, seed=0), _ColourCodedScenes(16, seed=1))
    assert metrics["pixel_accuracy"] > 0.99
    assert metrics["miou"] > 0.98
    assert all(metrics[f"iou/{k}"] > 0.97 for k in range(NUM_CLASSES))


def test_random_labels_stay_at_chance():
    backbone = timm.create_model("resnet10t", pretrained=False)
    metrics = _probe(backbone, _RandomLabels(32, size=32, seed=0), _RandomLabels(16, size=32, seed=1), epochs=10)
    # Labels independent of the image: any predictor is right on 1/K of the pixels, up to sampling noise
    # (std sqrt(0.25 * 0.75 / 16384) ~ 0.003 here).
    assert abs(metrics["pixel_accuracy"] - 1.0 / NUM_CLASSES) < 0.02
    # The best an image-blind predictor can do is uniform guessing: IoU = (1/16) / (7/16) = 1/7 per class.
    assert metrics["miou"] < 1.0 / 7.0 + 0.02


def test_probe_is_deterministic_given_the_seed():
    backbone = timm.create_model("resnet10t", pretrained=False)
    train_set = ProceduralImages(16, image_size=32, seed=0)
    test_set = ProceduralImages(8, image_size=32, seed=1)
    first = _probe(backbone, train_set, test_set, epochs=3, batch_size=8)
    second = _probe(backbone, train_set, test_set, epochs=3, batch_size=8)
    other_seed = _probe(backbone, train_set, test_set, epochs=3, batch_size=8, seed=1)
    assert first == second
    assert first["train_loss"] != other_seed["train_loss"]  # the seed orders the minibatches


@pytest.mark.parametrize(("name", "image_size", "side"), [("resnet10t", 64, 2), ("resnet18", 96, 3)])
def test_timm_resnets_run_through_the_probe(name, image_size, side):
    backbone = timm.create_model(name, pretrained=False)
    backbone.train()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    dataset = ProceduralImages(6, image_size=image_size, num_classes=5, seed=0)
    features, labels = extract_dense_features(backbone, dataset, image_size=image_size, batch_size=4)
    assert features.shape == (6, 512, side, side)  # output stride 32
    assert features.dtype == torch.float32
    assert labels.shape == (6, image_size, image_size)
    assert torch.equal(labels[5], dataset.labels(5))
    metrics = dense_linear_probe(
        backbone, dataset, ProceduralImages(4, image_size=image_size, seed=1), image_size=image_size, epochs=2,
        batch_size=4, lr=0.01,
    )  # fmt: skip
    assert 0.0 <= metrics["miou"] <= 1.0
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0
    assert "iou/background" in metrics  # class names come from the data set
    # Frozen: BatchNorm statistics untouched (eval mode) and the caller's mode restored.
    assert backbone.training
    assert all(torch.equal(before[k], v) for k, v in backbone.state_dict().items())


def test_images_and_labels_are_resized_to_the_probe_size():
    dataset = ProceduralImages(2, image_size=64, seed=0)
    backbone = timm.create_model("resnet10t", pretrained=False)
    features, labels = extract_dense_features(backbone, dataset, image_size=32, batch_size=2)
    assert features.shape[-2:] == (1, 1)
    # Nearest-exact halving samples source pixel floor((i + 0.5) * 2) = 2i + 1.
    assert torch.equal(labels[1], dataset.labels(1)[1::2, 1::2])


def test_segmentation_scores_by_hand():
    # Rows: true class; columns: predicted class. Class 2 never occurs in the labels but is predicted twice.
    confusion = torch.tensor([[3, 1, 0], [0, 2, 2], [0, 0, 0]])
    metrics = _segmentation_scores(confusion, class_names=("a", "b", "c"))
    # IoU a = 3 / (3 + 1 + 0) = 0.75; IoU b = 2 / (2 + 2 + 1) = 0.4; c is absent from the labels and not averaged.
    assert metrics["iou/a"] == pytest.approx(0.75)
    assert metrics["iou/b"] == pytest.approx(0.4)
    assert "iou/c" not in metrics
    assert metrics["miou"] == pytest.approx(0.575)
    assert metrics["pixel_accuracy"] == pytest.approx(5 / 8)


def test_ignored_pixels_are_neither_trained_nor_scored():
    train_set, test_set = _ColourCodedScenes(16, seed=0), _ColourCodedScenes(8, seed=1)
    # Relabel the class-3 pixels as ignored in both sets: the probe must then never see or score class 3.
    for dataset in (train_set, test_set):
        dataset.labels = torch.where(dataset.labels == 3, 255, dataset.labels)
    metrics = _probe(_LabelReadingBackbone(), train_set, test_set)
    assert "iou/3" not in metrics
    assert metrics["pixel_accuracy"] > 0.99


def test_format_probe_table():
    table = format_probe_table(
        {"random init": {"miou": 0.25, "pixel_accuracy": 0.5}, "pretrained": {"miou": 0.5, "train_loss": 1.0}}
    )
    expected = (
        "| backbone    |   miou | pixel_accuracy | train_loss |\n"
        "|-------------|-------:|---------------:|-----------:|\n"
        "| random init | 0.2500 |         0.5000 |          - |\n"
        "| pretrained  | 0.5000 |              - |     1.0000 |"
    )
    assert table == expected
    assert format_probe_table({"x": {"miou": 0.1, "pixel_accuracy": 0.2}}, columns=["pixel_accuracy"]).splitlines()[
        2
    ] == ("| x        |         0.2000 |")
    with pytest.raises(ValueError, match="empty"):
        format_probe_table({})


class _TokenBackbone(nn.Module):
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, H*W, 3), like a ViT


class _BadItems(torch.utils.data.Dataset):
    def __init__(self, label_shape: tuple[int, int], label_value: int = 0) -> None:
        self.label_shape, self.label_value = label_shape, label_value

    def __len__(self) -> int:
        return 3

    def __getitem__(self, index: int):
        return torch.zeros(3, 16, 16), np.full(self.label_shape, self.label_value, dtype=np.int64)


def test_bad_inputs_are_named():
    good = _BadItems((16, 16))
    with pytest.raises(ValueError, match=r"\(B, D, h, w\) map, got \(3, 256, 3\)"):
        extract_dense_features(_TokenBackbone(), good, image_size=16, batch_size=4)
    with pytest.raises(ValueError, match=r"item 0: labels of shape \(8, 8\) do not match the image size \(16, 16\)"):
        extract_dense_features(_LabelReadingBackbone(), _BadItems((8, 8)), image_size=16, batch_size=4)
    with pytest.raises(ValueError, match=r"test labels hold 7, outside \[0, 4\)"):
        dense_linear_probe(
            _LabelReadingBackbone(), _ColourCodedScenes(4), _BadItems((16, 16), label_value=7), image_size=16,
            epochs=1, batch_size=4, lr=0.1,
        )  # fmt: skip
    with pytest.raises(ValueError, match="empty"):
        extract_dense_features(_LabelReadingBackbone(), _ColourCodedScenes(0), image_size=16, batch_size=4)
    with pytest.raises(ValueError, match="lr"):
        _probe(_LabelReadingBackbone(), good, good, lr=0.0)
