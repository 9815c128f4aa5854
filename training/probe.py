"""Frozen dense linear probe: how well a per-pixel linear classifier reads segmentation labels off frozen features.

The backbone runs once over every image (eval mode, no gradients, ImageNet normalization); a 1x1 convolution on
standardised features is then trained with cross-entropy against per-pixel labels and scored by mIoU and pixel
accuracy on a held-out set. It is the quick check of the ``demo`` recipe (pretrained vs random-init backbone on
:class:`training.procedural.ProceduralImages`), in the spirit of the frozen linear segmentation heads of DINOv2's
evaluation, at laptop scale.

Labels stay at full resolution and the logits are upsampled to it, rather than the labels being downsampled to the
feature map: with an output stride of 32 a 96 px image gives a 3 x 3 map, and downsampled labels would both
discard the object boundaries and score a different, much coarser task than the segmentation one. Upsampling the
logits bilinearly is exactly the same as upsampling the features before the 1x1 convolution (both are linear maps
and bilinear weights sum to one, so the bias passes through unchanged), at a fraction of the memory: K channels
instead of D.

Symbols used in this module:
    N: images in a set. D: feature channels. h, w: feature map size. S: label (and input) side in pixels.
    K: classes. B: images in a batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import nn
from torch.utils.data import Dataset
from torchvision.transforms.functional import pil_to_tensor

__all__ = ["dense_linear_probe", "extract_dense_features", "format_probe_table"]

_logger = logging.getLogger(__name__)

_STD_EPS = 1e-5  # floor of the per-channel feature std in the standardisation (constant channels stay finite)


def extract_dense_features(
    backbone: nn.Module,
    dataset: Dataset,
    *,
    image_size: int,
    batch_size: int,
    device: str | torch.device = "cpu",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a frozen backbone over a labelled image set once.

    Images are resized (bicubic) and label maps (nearest) to ``image_size`` x ``image_size`` where they differ,
    normalized with ``mean``/``std`` and passed through ``backbone.forward_features`` in eval mode under no_grad.
    The backbone's training mode and device are restored afterwards.

    Args:
        backbone: a timm model (or any module with ``forward_features``) whose ``forward_features`` returns a
            spatial map (B, D, h, w).
        dataset: items ``(image, labels)``: an RGB ``PIL.Image`` or a (3, H, W) tensor (uint8, or float in
            [0, 1]), and an (H, W) integer label map (tensor or numpy array).
        image_size: side S of the square input and label maps.
        batch_size: images per forward pass.
        device: where the backbone runs.
        mean: per-channel input mean (default ImageNet, as the recipe normalizes its views).
        std: per-channel input std (default ImageNet).

    Returns:
        (features, labels): (N, D, h, w) float32 and (N, S, S) int64, both on the CPU.

    Raises:
        ValueError: on an empty dataset, a malformed item (wrong type, channels or label shape, naming the index)
            or a backbone whose ``forward_features`` is not a 4-D map.
    """
    if len(dataset) == 0:
        raise ValueError("dataset is empty")
    if image_size < 1 or batch_size < 1:
        raise ValueError(f"image_size and batch_size must be >= 1, got {image_size} and {batch_size}")
    device = torch.device(device)
    param = next(backbone.parameters(), None)
    home = param.device if param is not None else torch.device("cpu")
    was_training = backbone.training
    mean_t = torch.tensor(mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
    features, labels = [], []
    backbone.eval().to(device)
    try:
        with torch.no_grad():
            for start in range(0, len(dataset), batch_size):
                items = [
                    _load_item(dataset, i, image_size) for i in range(start, min(start + batch_size, len(dataset)))
                ]
                images = torch.stack([image for image, _ in items]).to(device)
                fmap = backbone.forward_features((images - mean_t) / std_t)
                if not isinstance(fmap, torch.Tensor) or fmap.ndim != 4:
                    shape = tuple(fmap.shape) if isinstance(fmap, torch.Tensor) else type(fmap).__name__
                    raise ValueError(
                        f"backbone.forward_features must return a (B, D, h, w) map, got {shape}; "
                        "token-sequence backbones need their tokens reshaped to a map first"
                    )
                features.append(fmap.float().cpu())
                labels.append(torch.stack([label for _, label in items]))
    finally:
        backbone.train(was_training).to(home)
    return torch.cat(features), torch.cat(labels)


def dense_linear_probe(
    backbone: nn.Module,
    train_set: Dataset,
    test_set: Dataset,
    *,
    image_size: int,
    epochs: int,
    batch_size: int,
    lr: float,
    device: str | torch.device = "cpu",
    seed: int = 0,
    weight_decay: float = 1e-4,
    num_classes: int | None = None,
    ignore_index: int = 255,
) -> dict[str, float]:
    """Train a per-pixel linear classifier on frozen dense features and score it on a held-out set.

    The features of both sets are computed once (:func:`extract_dense_features`) and standardised per channel with
    the mean and std of the train features (over images and map positions; no BatchNorm, so nothing depends on the
    batch). A zero-initialised 1x1 convolution maps them to K logits, which are upsampled bilinearly to the label
    resolution (the same as upsampling the features, see the module docstring) and trained with cross-entropy and
    AdamW, the learning rate following a cosine from ``lr`` to 0 over all steps. Given the seed (which orders the
    minibatches) the result is bitwise reproducible on the CPU; on CUDA the backward of bilinear upsampling
    accumulates in a nondeterministic order.

    Args:
        backbone: frozen timm backbone (see :func:`extract_dense_features`); left in its mode and on its device.
        train_set: labelled images to fit the classifier on (items as for :func:`extract_dense_features`).
        test_set: held-out labelled images to score.
        image_size: side S of inputs and label maps.
        epochs: passes over the train set.
        batch_size: images per step (for feature extraction too).
        lr: peak AdamW learning rate.
        device: where the backbone and the classifier run.
        seed: seeds the minibatch order (the classifier starts at zero, so nothing else is random).
        weight_decay: AdamW weight decay.
        num_classes: K; None reads ``train_set.num_classes`` or, failing that, takes the largest label seen + 1.
        ignore_index: label value excluded from the loss and the scores.

    Returns:
        ``miou`` (mean IoU over the classes present in the test labels), ``pixel_accuracy`` (over the test
        pixels not ignored), ``train_loss`` (mean cross-entropy of the last epoch) and ``iou/<class>`` for every
        class present in the test labels (``<class>`` from ``train_set.class_names`` where it has them, else the
        index).

    Raises:
        ValueError: on a non-positive ``epochs``/``batch_size``/``lr``, labels outside ``[0, K)`` other than
            ``ignore_index``, test labels with no scored pixel, or train and test features of different depths.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    device = torch.device(device)
    train_x, train_y = extract_dense_features(
        backbone, train_set, image_size=image_size, batch_size=batch_size, device=device
    )
    test_x, test_y = extract_dense_features(
        backbone, test_set, image_size=image_size, batch_size=batch_size, device=device
    )
    if train_x.shape[1] != test_x.shape[1]:
        raise ValueError(f"train features have {train_x.shape[1]} channels but test features {test_x.shape[1]}")
    if num_classes is None:
        num_classes = getattr(train_set, "num_classes", None)
    if num_classes is None:
        seen = torch.cat([train_y[train_y != ignore_index], test_y[test_y != ignore_index]])
        num_classes = int(seen.max()) + 1 if seen.numel() else 0
    if num_classes < 2:
        raise ValueError(f"a probe needs at least 2 classes, got num_classes={num_classes}")
    for name, labels in (("train", train_y), ("test", test_y)):
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
        if bad.any():
            raise ValueError(
                f"{name} labels hold {int(labels[bad][0])}, outside [0, {num_classes}) and not ignore_index "
                f"{ignore_index}"
            )

    # Per-channel standardisation from the train set: (N, D, h, w) -> (D,) statistics.
    feat_mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
    feat_std = train_x.std(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(_STD_EPS)
    train_x = ((train_x - feat_mean) / feat_std).to(device)
    test_x = ((test_x - feat_mean) / feat_std).to(device)
    train_y, test_y = train_y.to(device), test_y.to(device)

    classifier = nn.Conv2d(train_x.shape[1], num_classes, kernel_size=1).to(device)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    num_train = train_x.shape[0]
    steps_per_epoch = math.ceil(num_train / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    epoch_loss = 0.0
    for _ in range(epochs):
        order = torch.randperm(num_train, generator=generator).to(device)
        epoch_loss, epoch_pixels = 0.0, 0
        for start in range(0, num_train, batch_size):
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))
            batch = order[start : start + batch_size]
            logits = _upsampled_logits(classifier, train_x[batch], train_y.shape[-2:])
            loss = F.cross_entropy(logits, train_y[batch], ignore_index=ignore_index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            scored = int((train_y[batch] != ignore_index).sum())
            epoch_loss += loss.item() * scored
            epoch_pixels += scored
        epoch_loss /= max(epoch_pixels, 1)

    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    with torch.no_grad():
        for start in range(0, test_x.shape[0], batch_size):
            pred = _upsampled_logits(classifier, test_x[start : start + batch_size], test_y.shape[-2:]).argmax(1)
            target = test_y[start : start + batch_size]
            valid = target != ignore_index
            # (true class, predicted class) pairs counted into a K x K matrix.
            confusion += torch.bincount(
                target[valid] * num_classes + pred[valid], minlength=num_classes * num_classes
            ).view(num_classes, num_classes)
    metrics = _segmentation_scores(confusion.cpu(), class_names=getattr(train_set, "class_names", None))
    metrics["train_loss"] = epoch_loss
    _logger.info("dense linear probe: %s", {k: round(v, 4) for k, v in metrics.items()})
    return metrics


def format_probe_table(rows: dict[str, dict[str, float]], *, columns: Sequence[str] | None = None) -> str:
    """Markdown table of probe results, one row per backbone (e.g. ``{"random init": ..., "pretrained": ...}``).

    Args:
        rows: row name -> metrics, as :func:`dense_linear_probe` returns them.
        columns: metrics to show, in order; None shows every metric in order of first appearance. A metric that
            a row lacks shows as ``-``.

    Returns:
        The table, columns padded to align, without a trailing newline.

    Raises:
        ValueError: if ``rows`` is empty.
    """
    if not rows:
        raise ValueError("rows is empty: nothing to tabulate")
    if columns is None:
        columns = list(dict.fromkeys(key for metrics in rows.values() for key in metrics))
    header = ["backbone", *columns]
    body = [[name, *(_format_value(metrics.get(c)) for c in columns)] for name, metrics in rows.items()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def _line(cells: list[str]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [cell.rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|"
    return "\n".join([_line(header), rule, *(_line(row) for row in body)])


def _format_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _upsampled_logits(classifier: nn.Conv2d, features: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """(B, D, h, w) standardised features -> (B, K, S, S) logits, bilinearly upsampled to the label size."""
    return F.interpolate(classifier(features), size=tuple(size), mode="bilinear", align_corners=False)


def _segmentation_scores(confusion: torch.Tensor, *, class_names: Sequence[str] | None) -> dict[str, float]:
    """mIoU, pixel accuracy and per-class IoU from a (K, K) confusion matrix (rows: true class, columns: predicted).

    IoU of class k = TP / (TP + FP + FN); the mean runs over the classes with at least one true pixel, so a class
    absent from the test labels neither counts as 0 nor as 1 (its false positives still lower the IoU of the true
    classes of those pixels).
    """
    confusion = confusion.double()
    total = float(confusion.sum())
    if total == 0:
        raise ValueError("the test set has no scored pixel (all labels are ignore_index)")
    true_positive = confusion.diag()
    true_count = confusion.sum(dim=1)
    union = true_count + confusion.sum(dim=0) - true_positive
    present = true_count > 0
    iou = true_positive[present] / union[present]
    metrics = {"miou": float(iou.mean()), "pixel_accuracy": float(true_positive.sum()) / total}
    names = list(class_names) if class_names is not None and len(class_names) == confusion.shape[0] else None
    for k, value in zip(present.nonzero().flatten().tolist(), iou.tolist(), strict=True):
        metrics[f"iou/{names[k] if names else k}"] = value
    return metrics


def _load_item(dataset: Dataset, index: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Item ``index`` as a (3, S, S) float image in [0, 1] and an (S, S) int64 label map."""
    item: Any = dataset[index]
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(f"dataset item {index} must be an (image, labels) pair, got {type(item).__name__}")
    image, labels = item
    if isinstance(image, Image.Image):
        image = pil_to_tensor(image.convert("RGB"))
    if not isinstance(image, torch.Tensor) or image.ndim != 3 or image.shape[0] != 3:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"dataset item {index}: image must be an RGB PIL image or a (3, H, W) tensor, got {shape}")
    image = image.float() / 255.0 if image.dtype == torch.uint8 else image.float()
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if not isinstance(labels, torch.Tensor) or labels.ndim != 2 or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"dataset item {index}: labels must be an (H, W) integer map, got {shape}")
    if tuple(labels.shape) != tuple(image.shape[1:]):
        raise ValueError(
            f"dataset item {index}: labels of shape {tuple(labels.shape)} do not match the image size "
            f"{tuple(image.shape[1:])}"
        )
    if tuple(image.shape[1:]) != (image_size, image_size):
        image = F.interpolate(
            image[None], size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=True
        )[0].clamp(0.0, 1.0)
        labels = F.interpolate(labels[None, None].float(), size=(image_size, image_size), mode="nearest-exact")[0, 0]
    return image, labels.long()
