"""CLoVE loss: parity with the reference fixtures, an independent per-cell implementation, and degenerate cases."""

from __future__ import annotations

import hashlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from clove_timm.loss import CLoVELoss, clove_pair_loss
from tests.conftest import FIXTURES, SHARED_FIXTURES

GOLDEN = FIXTURES / "clove_loss_golden.safetensors"
PAIR_CASES = ["global_global", "local_global", "small_dim"]


@pytest.fixture(scope="module")
def golden():
    return load_file(GOLDEN)


def test_fixture_copies_match_the_published_reference_outputs():
    if not SHARED_FIXTURES.is_dir():
        pytest.skip("../shared/fixtures/official is not beside this clone")
    for name in ("clove_loss_golden.safetensors", "clove_loss_golden.json", "official_checkpoint_layout.json"):
        ours = hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest()
        theirs = hashlib.sha256((SHARED_FIXTURES / name).read_bytes()).hexdigest()
        assert ours == theirs, f"tests/fixtures/{name} differs from {SHARED_FIXTURES / name}"


def test_fixture_hyperparameters_are_our_defaults():
    hp = json.loads((FIXTURES / "clove_loss_golden.json").read_text())["hyperparameters"]
    assert hp == {"lambda": 2.0, "pos_ratio": 0.7, "margin": 100.0, "topk": 10}


@pytest.mark.parametrize("case", PAIR_CASES)
@pytest.mark.parametrize(("key", "margin", "tol"), [("loss", 100.0, 3e-5), ("loss_margin1", 1.0, 2e-6)])
def test_pair_loss_matches_reference(golden, case, key, margin, tol):
    loss = clove_pair_loss(
        golden[f"{case}.q"], golden[f"{case}.k"], golden[f"{case}.coord_q"], golden[f"{case}.coord_k"], margin=margin
    )
    assert loss.dtype == torch.float32 and loss.ndim == 0
    assert abs(loss.double().item() - golden[f"{case}.{key}"].item()) <= tol


def test_multicrop_loss_matches_reference(golden):
    coords = golden["multicrop.coords"]  # (8, N, 4): 2 global then 6 local views
    loss = CLoVELoss()(
        golden["multicrop.global_maps"],
        golden["multicrop.local_maps"],
        golden["multicrop.teacher_maps"],
        coords[:2],
        coords[2:],
    )
    assert abs(loss.double().item() - golden["multicrop.loss"].item()) <= 3e-5


# ----------------------------------------------------------------------------------------------------------------
# An independent, deliberately naive implementation of method doc section 4, cell by cell in float64.


def _naive_centres(box, h, w):
    x_ul, y_ul, x_lr, y_lr = box
    bw, bh = (x_lr - x_ul) / w, (y_lr - y_ul) / h
    return [(x_ul + (c + 0.5) * bw, y_ul + (r + 0.5) * bh) for r in range(h) for c in range(w)], math.hypot(bw, bh)


def _naive_pair_loss(q, k, bq, bk, pos_ratio=0.7, lam=2.0, margin=100.0, topk=10):
    total = 0.0
    for b in range(q.shape[0]):
        hq, wq = q.shape[-2:]
        hk, wk = k.shape[-2:]
        cq, dq = _naive_centres(bq[b].tolist(), hq, wq)
        ck, dk = _naive_centres(bk[b].tolist(), hk, wk)
        qs = q[b].double().flatten(1).T
        ks = k[b].double().flatten(1).T
        sim = qs @ ks.T
        pos_sum, pos_n, neg_means = 0.0, 0, []
        for i, (xi, yi) in enumerate(cq):
            non_pos = []
            for j, (xj, yj) in enumerate(ck):
                if math.hypot(xi - xj, yi - yj) / max(dq, dk) < pos_ratio:
                    pos_sum += sim[i, j].item()
                    pos_n += 1
                else:
                    non_pos.append(sim[i, j].item())
            hard = sorted(non_pos, reverse=True)[:topk][1:]
            neg_means.append(sum(hard) / len(hard))
        pos = pos_sum / (pos_n + 1e-6)
        neg = sum(neg_means) / len(neg_means)
        total += max(0.0, margin - 2 * lam * pos + 2 * neg)
    return total / q.shape[0]


def _random_boxes(n, generator, flip=True):
    xy = torch.rand(n, 2, generator=generator) * 0.5
    wh = 0.3 + torch.rand(n, 2, generator=generator) * 0.5
    boxes = torch.cat([xy, (xy + wh).clamp(max=1.0)], dim=1)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        boxes[flipped] = boxes[flipped][:, [2, 1, 0, 3]]
    return boxes


def _unit_maps(shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator), dim=1)


@pytest.mark.parametrize(
    ("student_hw", "teacher_hw", "channels", "margin"),
    [((7, 7), (7, 7), 64, 100.0), ((3, 3), (7, 7), 32, 1.0), ((5, 4), (6, 7), 16, 0.5), ((7, 7), (5, 5), 8, 3.0)],
)
def test_pair_loss_matches_naive_implementation(student_hw, teacher_hw, channels, margin):
    g = torch.Generator().manual_seed(hash((student_hw, teacher_hw, channels)) % 2**31)
    q = _unit_maps((3, channels, *student_hw), g)
    k = _unit_maps((3, channels, *teacher_hw), g)
    bq, bk = _random_boxes(3, g), _random_boxes(3, g)
    expected = _naive_pair_loss(q, k, bq, bk, margin=margin)
    got = clove_pair_loss(q, k, bq, bk, margin=margin)
    assert got.item() == pytest.approx(expected, abs=3e-5)


def test_pair_loss_reduction_none_gives_per_image_losses():
    g = torch.Generator().manual_seed(1)
    q, k = _unit_maps((4, 16, 7, 7), g), _unit_maps((4, 16, 7, 7), g)
    bq, bk = _random_boxes(4, g), _random_boxes(4, g)
    per_image = clove_pair_loss(q, k, bq, bk, reduction="none")
    assert per_image.shape == (4,)
    for b in range(4):
        assert per_image[b].item() == pytest.approx(
            _naive_pair_loss(q[b : b + 1], k[b : b + 1], bq[b : b + 1], bk[b : b + 1]), abs=3e-5
        )


def test_multicrop_equals_mean_of_the_reference_pairing():
    g = torch.Generator().manual_seed(2)
    batch, channels, num_local = 2, 16, 3
    sg = _unit_maps((2 * batch, channels, 7, 7), g)
    sl = _unit_maps((num_local * batch, channels, 3, 3), g)
    tg = _unit_maps((2 * batch, channels, 7, 7), g)
    gb = torch.stack([_random_boxes(batch, g) for _ in range(2)])
    lb = torch.stack([_random_boxes(batch, g) for _ in range(num_local)])
    terms = []
    for j in range(2):  # teacher view
        for i in range(2):
            if i != j:
                terms.append(
                    _naive_pair_loss(sg[i * batch : (i + 1) * batch], tg[j * batch : (j + 1) * batch], gb[i], gb[j])
                )
        for i in range(num_local):
            terms.append(
                _naive_pair_loss(sl[i * batch : (i + 1) * batch], tg[j * batch : (j + 1) * batch], lb[i], gb[j])
            )
    assert len(terms) == 2 * (1 + num_local)
    got = CLoVELoss()(sg, sl, tg, gb, lb)
    assert got.item() == pytest.approx(sum(terms) / len(terms), abs=3e-5)


def test_multicrop_without_local_views():
    g = torch.Generator().manual_seed(3)
    sg, tg = _unit_maps((4, 8, 7, 7), g), _unit_maps((4, 8, 7, 7), g)
    gb = torch.stack([_random_boxes(2, g) for _ in range(2)])
    expected = (_naive_pair_loss(sg[:2], tg[2:], gb[0], gb[1]) + _naive_pair_loss(sg[2:], tg[:2], gb[1], gb[0])) / 2
    assert CLoVELoss()(sg, None, tg, gb).item() == pytest.approx(expected, abs=3e-5)


# ----------------------------------------------------------------------------------------------------------------
# Degenerate cases: the reference returns 0 (inf in its top-k) or NaN gradients; ours stays finite.


def _loss_and_grad(q, k, bq, bk, **kwargs):
    q = q.clone().requires_grad_(True)
    loss = clove_pair_loss(q, k, bq, bk, **kwargs)
    loss.sum().backward()
    return loss, q.grad


def test_fewer_candidates_than_num_negatives_is_finite_and_averages_what_exists():
    # Teacher 3x3 = 9 cells; the same box with pos_ratio 0.71 makes each student cell's 4-neighbours positive,
    # so some cells have as few as 4 non-positive teacher cells (< 10 negatives requested).
    g = torch.Generator().manual_seed(4)
    q, k = _unit_maps((2, 8, 3, 3), g), _unit_maps((2, 8, 3, 3), g)
    box = torch.tensor([[0.1, 0.1, 0.9, 0.9]]).repeat(2, 1)
    loss, grad = _loss_and_grad(q, k, box, box, pos_ratio=0.71)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0
    # Hand check for image 0: average over the non-positive cells that exist, hardest one dropped.
    s = q[0].flatten(1).T @ k[0].flatten(1)
    pos_mask = torch.zeros(9, 9, dtype=torch.bool)
    for i in range(9):
        r, c = divmod(i, 3)
        for j in range(9):
            rr, cc = divmod(j, 3)
            pos_mask[i, j] = abs(r - rr) + abs(c - cc) <= 1
    pos = s[pos_mask].sum() / (pos_mask.sum() + 1e-6)
    negs = []
    for i in range(9):
        cand = sorted(s[i][~pos_mask[i]].tolist(), reverse=True)[1:10]
        negs.append(sum(cand) / len(cand))
    expected0 = 100 - 4 * pos.item() + 2 * sum(negs) / 9
    per_image = clove_pair_loss(q, k, box, box, pos_ratio=0.71, reduction="none")
    assert per_image[0].item() == pytest.approx(expected0, abs=3e-5)


def test_no_negative_at_all_is_finite():
    # pos_ratio large enough that every pair is positive: no negatives, the negative term is 0.
    g = torch.Generator().manual_seed(5)
    q, k = _unit_maps((2, 8, 3, 3), g), _unit_maps((2, 8, 3, 3), g)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(2, 1)
    loss, grad = _loss_and_grad(q, k, box, box, pos_ratio=100.0, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    pos = torch.einsum("bcl,bcm->b", q.flatten(2), k.flatten(2)) / (81 + 1e-6)
    torch.testing.assert_close(loss.detach(), 100 - 4 * pos, atol=3e-5, rtol=0)


def test_no_positive_at_all_is_finite():
    g = torch.Generator().manual_seed(6)
    q, k = _unit_maps((2, 8, 7, 7), g), _unit_maps((2, 8, 7, 7), g)
    a = torch.tensor([[0.0, 0.0, 0.2, 0.2]]).repeat(2, 1)
    b = torch.tensor([[0.8, 0.8, 1.0, 1.0]]).repeat(2, 1)
    loss, grad = _loss_and_grad(q, k, a, b)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert loss.item() == pytest.approx(_naive_pair_loss(q, k, a, b), abs=3e-5)


def test_zero_size_boxes_are_finite():
    g = torch.Generator().manual_seed(7)
    q, k = _unit_maps((2, 8, 3, 3), g), _unit_maps((2, 8, 7, 7), g)
    point = torch.tensor([[0.5, 0.5, 0.5, 0.5]]).repeat(2, 1)
    loss, grad = _loss_and_grad(q, k, point, point)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    loss, grad = _loss_and_grad(q, k, point, _random_boxes(2, g, flip=False))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_loss_is_float32_under_autocast():
    g = torch.Generator().manual_seed(8)
    q, k = _unit_maps((2, 16, 7, 7), g), _unit_maps((2, 16, 7, 7), g)
    bq, bk = _random_boxes(2, g), _random_boxes(2, g)
    reference = clove_pair_loss(q, k, bq, bk)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        in_autocast = clove_pair_loss(q.bfloat16(), k.bfloat16(), bq, bk)
    assert in_autocast.dtype == torch.float32
    # Inputs rounded to bf16 change the value a little; the arithmetic itself is fp32.
    expected = clove_pair_loss(q.bfloat16().float(), k.bfloat16().float(), bq, bk)
    assert in_autocast.item() == pytest.approx(expected.item(), abs=3e-5)
    assert in_autocast.item() == pytest.approx(reference.item(), abs=0.05)


# ----------------------------------------------------------------------------------------------------------------
# Ablations.


def test_l2_objective_by_hand():
    g = torch.Generator().manual_seed(9)
    sg, tg = _unit_maps((2, 4, 2, 2), g), _unit_maps((2, 4, 2, 2), g)
    box = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    boxes = box.expand(2, 1, 4)  # (G=2, B=1, 4): both views the same crop, so cell i matches cell i only
    loss = CLoVELoss(objective="l2", pos_ratio=0.5)(sg, None, tg, boxes)
    d01 = ((sg[0] - tg[1]) ** 2).sum(0).flatten()  # ||q - k||^2 per cell, view 0 -> teacher 1
    d10 = ((sg[1] - tg[0]) ** 2).sum(0).flatten()
    expected = (d01.sum() / (4 + 1e-6) + d10.sum() / (4 + 1e-6)) / 2
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)


@pytest.mark.parametrize("source", ["inter", "inter_avg"])
def test_inter_image_queue(source):
    g = torch.Generator().manual_seed(10)
    criterion = CLoVELoss(negatives=source, queue_size=32, embed_dim=8)
    sg, tg = _unit_maps((4, 8, 3, 3), g), _unit_maps((4, 8, 3, 3), g)
    gb = torch.stack([_random_boxes(2, g) for _ in range(2)])
    loss = criterion(sg, None, tg, gb)
    # Hand check for the first (pair, image): view 0 of image 0 against teacher view 1, negatives from the queue.
    queue = criterion.queue.clone()
    s = sg[0].flatten(1).T  # (9, 8)
    hard = (s @ queue.T).topk(10, dim=1).values[:, 1:].mean(1).mean()
    t = tg[2].flatten(1).T
    from clove_timm.matching import positive_mask

    pos_mask = positive_mask(gb[0, :1], gb[1, :1], (3, 3), (3, 3))[0]
    pos = (s @ t.T)[pos_mask].sum() / (pos_mask.sum() + 1e-6)
    first = 100 - 4 * pos + 2 * hard
    per_pair, _, _ = criterion._view_losses(sg, tg, gb, gb, same_views=True)  # (pairs, B)
    assert per_pair[0, 0].item() == pytest.approx(first.item(), abs=3e-5)
    assert loss.item() == pytest.approx(per_pair.mean().item(), abs=1e-6)
    # Enqueue: one unit vector per image, written at the pointer, ring-buffer wrap-around.
    candidates = criterion.queue_candidates(tg, num_global=2, generator=torch.Generator().manual_seed(0))
    assert candidates.shape == (2, 8)
    torch.testing.assert_close(candidates.norm(dim=1), torch.ones(2))
    if source == "inter":
        for b in range(2):  # a cell of one of image b's global teacher views (rows b and B + b)
            image_cells = torch.cat([tg[b].flatten(1), tg[2 + b].flatten(1)], dim=1).T
            assert (image_cells - candidates[b]).abs().sum(1).min() < 1e-6
    else:
        mean = torch.cat([tg[0].flatten(1), tg[2].flatten(1)], dim=1).mean(1)
        torch.testing.assert_close(candidates[0], F.normalize(mean, dim=0))
    for _ in range(17):
        criterion.enqueue(candidates)
    assert criterion.queue_ptr.item() == (17 * 2) % 32
    torch.testing.assert_close(criterion.queue[0], candidates[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_negatives=1), "num_negatives"),
        (dict(pos_ratio=0.0), "pos_ratio"),
        (dict(objective="mse"), "objective"),
        (dict(negatives="queue"), "negatives"),
        (dict(negatives="inter", queue_size=4), "queue_size"),
    ],
)
def test_bad_loss_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CLoVELoss(**kwargs)


def test_bad_shapes_are_named():
    q = torch.zeros(2, 8, 7, 7)
    with pytest.raises(ValueError, match="student"):
        clove_pair_loss(q.flatten(2), q, torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="boxes"):
        clove_pair_loss(q, q, torch.zeros(3, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="G\\*B"):
        CLoVELoss()(q, None, q[:1], torch.zeros(2, 2, 4) + 0.5)


@pytest.mark.parametrize("views", [1, 2, 3, 4])
def test_off_diagonal_selection_by_reshape(views):
    from clove_timm.loss import _off_diagonal

    x = torch.arange(views * views * 2).view(views, views, 2)
    expected = [x[i, j].tolist() for i in range(views) for j in range(views) if i != j]
    assert _off_diagonal(x).tolist() == expected


def test_loss_parts_recombine_into_the_loss():
    g = torch.Generator().manual_seed(11)
    batch, num_local = 2, 3
    sg = _unit_maps((2 * batch, 8, 7, 7), g)
    sl = _unit_maps((num_local * batch, 8, 3, 3), g)
    tg = _unit_maps((2 * batch, 8, 7, 7), g)
    gb = torch.stack([_random_boxes(batch, g) for _ in range(2)])
    lb = torch.stack([_random_boxes(batch, g) for _ in range(num_local)])
    criterion = CLoVELoss()
    loss, parts = criterion(sg, sl, tg, gb, lb, return_parts=True)
    assert loss.item() == pytest.approx(criterion(sg, sl, tg, gb, lb).item(), abs=1e-6)
    # 2 global-global and 2 * num_local local-global pairs, equal batch sizes: the loss is their weighted mean.
    expected = (2 * parts["global"] + 2 * num_local * parts["local"]) / (2 + 2 * num_local)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    # With margin 100 the hinge is active everywhere: loss = 100 - 4 * pos + 2 * neg on the means as well.
    assert loss.item() == pytest.approx(
        100 - 4 * parts["pos_similarity"].item() + 2 * parts["neg_similarity"].item(), abs=1e-4
    )
    assert not any(p.requires_grad for p in parts.values())
    _, l2_parts = CLoVELoss(objective="l2")(sg, sl, tg, gb, lb, return_parts=True)
    assert "neg_similarity" not in l2_parts and set(l2_parts) == {"global", "local", "pos_similarity"}


def test_single_global_view_pairs_only_local_views():
    g = torch.Generator().manual_seed(12)
    sg, tg = _unit_maps((2, 8, 3, 3), g), _unit_maps((2, 8, 3, 3), g)
    sl = _unit_maps((4, 8, 2, 2), g)
    gb = _random_boxes(2, g)[None]  # (G=1, B=2, 4)
    lb = torch.stack([_random_boxes(2, g) for _ in range(2)])
    loss, parts = CLoVELoss()(sg, sl, tg, gb, lb, return_parts=True)
    expected = [_naive_pair_loss(sl[i * 2 : (i + 1) * 2], tg, lb[i], gb[0]) for i in range(2)]
    assert loss.item() == pytest.approx(sum(expected) / 2, abs=3e-5)
    assert "global" not in parts and parts["local"].item() == pytest.approx(loss.item(), abs=1e-5)
