"""Pixel-to-neighbourhood matching between two views of the same image.

Every view carries its crop box in original-image coordinates, ``(x_ul, y_ul, x_lr, y_lr)`` in [0, 1], with
``x_ul > x_lr`` when the view was flipped horizontally (method doc section 3). A feature map of size H x W splits
the box into H x W bins; a student cell and a teacher cell are a positive pair when their centres are closer than
``pos_ratio`` times the larger of the two bin diagonals (method doc section 4, reference ``contrast/loss.py``).

Symbols used in this module:
    B: batch size.
    Hs, Ws / Ht, Wt: student / teacher feature-map height and width.
    Ls = Hs * Ws, Lt = Ht * Wt: number of cells (locations) of each map.
"""

from __future__ import annotations

import torch

__all__ = ["bin_diagonal", "cell_centers", "positive_mask"]

# Smallest bin diagonal used as a divisor. Only a zero-size box (both views collapsed to a point) reaches it; any
# real crop of a >= 2 px image has a diagonal of at least 1 / (image side - 1) / map side, far above this value.
_MIN_BIN_DIAGONAL = 1e-12


def _check_boxes(boxes: torch.Tensor, name: str) -> None:
    if boxes.ndim != 2 or boxes.shape[-1] != 4:
        raise ValueError(f"{name} must have shape (B, 4) as (x_ul, y_ul, x_lr, y_lr), got {tuple(boxes.shape)}")
    if not boxes.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {boxes.dtype}")


def _check_grid(height: int, width: int, name: str) -> None:
    if height < 1 or width < 1:
        raise ValueError(f"{name} grid must be at least 1 x 1, got {height} x {width}")


def cell_centers(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centres of the cells of an ``height x width`` feature map in original-image coordinates.

    Cell ``(r, c)`` has centre ``(x_ul + (c + 0.5) * bin_w, y_ul + (r + 0.5) * bin_h)`` with signed bin sizes
    ``bin_w = (x_lr - x_ul) / width`` and ``bin_h = (y_lr - y_ul) / height``; a flipped box has a negative
    ``bin_w``, which mirrors the grid (method doc section 4).

    Args:
        boxes: (B, 4) crop boxes ``(x_ul, y_ul, x_lr, y_lr)``.
        height: feature-map height H.
        width: feature-map width W.

    Returns:
        (B, H*W, 2) cell centres as (x, y), cells in row-major order (the order of ``map.flatten(2)``).
    """
    _check_boxes(boxes, "boxes")
    _check_grid(height, width, "feature-map")
    bin_w = ((boxes[:, 2] - boxes[:, 0]) / width).view(-1, 1, 1)  # (B, 1, 1)
    bin_h = ((boxes[:, 3] - boxes[:, 1]) / height).view(-1, 1, 1)
    cols = torch.arange(width, dtype=boxes.dtype, device=boxes.device).view(1, 1, width)
    rows = torch.arange(height, dtype=boxes.dtype, device=boxes.device).view(1, height, 1)
    # Same operation order as the reference, so that a threshold decision never differs by a rounding step.
    x = (cols + 0.5) * bin_w + boxes[:, 0].view(-1, 1, 1)  # (B, 1, W) -> broadcast below
    y = (rows + 0.5) * bin_h + boxes[:, 1].view(-1, 1, 1)  # (B, H, 1)
    x, y = torch.broadcast_tensors(x, y)  # (B, H, W) each
    return torch.stack((x, y), dim=-1).flatten(1, 2)  # (B, H, W, 2) -> (B, H*W, 2)


def bin_diagonal(boxes: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Diagonal of one bin of an ``height x width`` grid laid over each box.

    Args:
        boxes: (B, 4) crop boxes.
        height: feature-map height H.
        width: feature-map width W.

    Returns:
        (B,) ``sqrt(bin_w**2 + bin_h**2)``.
    """
    _check_boxes(boxes, "boxes")
    _check_grid(height, width, "feature-map")
    bin_w = (boxes[:, 2] - boxes[:, 0]) / width
    bin_h = (boxes[:, 3] - boxes[:, 1]) / height
    return torch.sqrt(bin_w**2 + bin_h**2)


def positive_mask(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    student_size: tuple[int, int],
    teacher_size: tuple[int, int],
    *,
    pos_ratio: float = 0.7,
) -> torch.Tensor:
    """Which (student cell, teacher cell) pairs look at the same part of the image.

    The distance between two cells is the Euclidean distance of their centres divided by the larger of the two
    bin diagonals; pairs closer than ``pos_ratio`` are positive (method doc section 4; ``pos_ratio=0.7`` is the
    paper's T_pos, Table 11).

    Deviation from the reference: a zero-size box on both sides gives ``0 / 0`` there (no positive, NaN distance);
    here the divisor is floored at 1e-12, so two views collapsed onto the same point match and views collapsed onto
    different points do not. Non-degenerate boxes give exactly the reference decision.

    The geometry is evaluated in float64 where the device supports it (the tensors are tiny), so a centre that lies
    within float32 rounding of the threshold is decided as the float64 reference decides it.

    Args:
        student_boxes: (B, 4) boxes of the student view.
        teacher_boxes: (B, 4) boxes of the teacher view.
        student_size: (Hs, Ws) of the student feature map.
        teacher_size: (Ht, Wt) of the teacher feature map.
        pos_ratio: distance threshold in units of the larger bin diagonal.

    Returns:
        (B, Ls, Lt) boolean mask, True for positive pairs.
    """
    _check_boxes(student_boxes, "student_boxes")
    _check_boxes(teacher_boxes, "teacher_boxes")
    if student_boxes.shape[0] != teacher_boxes.shape[0]:
        raise ValueError(
            f"student_boxes and teacher_boxes disagree on batch size: {student_boxes.shape[0]} vs "
            f"{teacher_boxes.shape[0]}"
        )
    if pos_ratio <= 0:
        raise ValueError(f"pos_ratio must be positive, got {pos_ratio}")
    dtype = torch.float32 if student_boxes.device.type == "mps" else torch.float64
    student_boxes = student_boxes.detach().to(dtype)
    teacher_boxes = teacher_boxes.detach().to(dtype)
    (hs, ws), (ht, wt) = student_size, teacher_size

    student_xy = cell_centers(student_boxes, hs, ws)  # (B, Ls, 2)
    teacher_xy = cell_centers(teacher_boxes, ht, wt)  # (B, Lt, 2)
    max_diag = torch.maximum(bin_diagonal(student_boxes, hs, ws), bin_diagonal(teacher_boxes, ht, wt))
    max_diag = max_diag.clamp_min(_MIN_BIN_DIAGONAL).view(-1, 1, 1)  # (B, 1, 1)
    dx = student_xy[:, :, None, 0] - teacher_xy[:, None, :, 0]  # (B, Ls, Lt)
    dy = student_xy[:, :, None, 1] - teacher_xy[:, None, :, 1]
    distance = torch.sqrt(dx**2 + dy**2) / max_diag
    return distance < pos_ratio
