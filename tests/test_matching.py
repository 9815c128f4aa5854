"""Geometry of the positive mask: cell centres and distances derived by hand."""

from __future__ import annotations

import math

import pytest
import torch

from clove_timm.matching import bin_diagonal, cell_centers, positive_mask


def test_cell_centers_unflipped_box_by_hand():
    # Box from x=0.2..0.6, y=0.0..0.8 split into 2 rows x 4 columns: bins of 0.1 x 0.4.
    boxes = torch.tensor([[0.2, 0.0, 0.6, 0.8]], dtype=torch.float64)
    centers = cell_centers(boxes, 2, 4)
    expected = [(0.25, 0.2), (0.35, 0.2), (0.45, 0.2), (0.55, 0.2), (0.25, 0.6), (0.35, 0.6), (0.45, 0.6), (0.55, 0.6)]
    assert centers.shape == (1, 8, 2)
    torch.testing.assert_close(centers[0], torch.tensor(expected, dtype=torch.float64))


def test_flipped_box_mirrors_the_grid():
    # The flipped view stores x_ul > x_lr: column 0 of the map is the right edge of the crop.
    boxes = torch.tensor([[0.6, 0.0, 0.2, 0.8]], dtype=torch.float64)
    centers = cell_centers(boxes, 2, 4)
    assert centers[0, 0].tolist() == pytest.approx([0.55, 0.2])
    assert centers[0, 3].tolist() == pytest.approx([0.25, 0.2])


def test_bin_diagonal_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 0.3, 0.4], [0.3, 0.0, 0.0, 0.4]])
    torch.testing.assert_close(bin_diagonal(boxes, 1, 1), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(bin_diagonal(boxes, 2, 2), torch.tensor([0.25, 0.25]))


def test_positive_mask_identical_views_is_identity_for_small_ratio():
    boxes = torch.tensor([[0.1, 0.1, 0.9, 0.9]])
    mask = positive_mask(boxes, boxes, (3, 3), (3, 3), pos_ratio=0.7)
    # Neighbouring cells are one bin width apart = 1/sqrt(2) diagonal ~ 0.707 > 0.7: only the same cell matches.
    assert torch.equal(mask[0], torch.eye(9, dtype=torch.bool))
    mask = positive_mask(boxes, boxes, (3, 3), (3, 3), pos_ratio=0.71)
    assert mask[0, 4].sum() == 5  # centre cell + its 4 edge neighbours


def test_positive_mask_uses_the_larger_bin_diagonal():
    # Student: 1x1 map over the whole image (bin diagonal sqrt(2)); teacher: 2x2 map (bin diagonal sqrt(2)/2).
    # Teacher centres are (0.25|0.75, 0.25|0.75); the student centre (0.5, 0.5) is sqrt(2)/4 from each,
    # i.e. 0.25 of the larger diagonal: all four teacher cells are positive.
    student = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    mask = positive_mask(student, student, (1, 1), (2, 2), pos_ratio=0.26)
    assert mask.shape == (1, 1, 4) and mask.all()
    assert not positive_mask(student, student, (1, 1), (2, 2), pos_ratio=0.24).any()


def test_positive_mask_disjoint_crops_have_no_positive():
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]])
    b = torch.tensor([[0.8, 0.8, 1.0, 1.0]])
    assert not positive_mask(a, b, (7, 7), (7, 7)).any()


def test_positive_mask_flip_matches_mirrored_cells():
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    flipped = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    mask = positive_mask(box, flipped, (1, 4), (1, 4), pos_ratio=0.1)[0]
    expected = torch.zeros(4, 4, dtype=torch.bool)
    for c in range(4):
        expected[c, 3 - c] = True
    assert torch.equal(mask, expected)


def test_zero_size_boxes_are_decided_not_nan():
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]])
    other = torch.tensor([[0.2, 0.2, 0.2, 0.2]])
    assert positive_mask(point, point, (2, 2), (2, 2)).all()
    assert not positive_mask(point, other, (2, 2), (2, 2)).any()


def test_threshold_sits_at_pos_ratio_bin_diagonals():
    # 1x1 grids over unit boxes: bin diagonal sqrt(2). Centres shifted by 0.7 * sqrt(2) on x are 0.7 diagonals apart.
    a = torch.tensor([[0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    shift = 0.7 * math.sqrt(2.0)
    b = torch.tensor([[shift, 0.0, 1.0 + shift, 1.0]], dtype=torch.float64)
    d = positive_mask(a, b, (1, 1), (1, 1), pos_ratio=0.7 + 1e-9)
    assert d.all()
    assert not positive_mask(a, b, (1, 1), (1, 1), pos_ratio=0.7 - 1e-9).any()


@pytest.mark.parametrize(
    ("boxes", "message"),
    [
        (torch.zeros(2, 3), "shape"),
        (torch.zeros(4, dtype=torch.float32), "shape"),
        (torch.zeros(2, 4, dtype=torch.long), "floating"),
    ],
)
def test_bad_boxes_are_named(boxes, message):
    with pytest.raises((ValueError, TypeError), match=message):
        positive_mask(boxes, boxes, (2, 2), (2, 2))


def test_batch_mismatch_is_reported():
    with pytest.raises(ValueError, match="batch size"):
        positive_mask(torch.zeros(2, 4), torch.zeros(3, 4), (2, 2), (2, 2))
