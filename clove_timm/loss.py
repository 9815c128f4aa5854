"""The CLoVE objective: rank each matched teacher location above hard negatives from the same image.

For one (student view, teacher view) pair of one image, with ``s`` the cosine similarity of every student cell
with every teacher cell (both maps L2-normalized over channels) and the positive mask from
:func:`clove_timm.matching.positive_mask` (method doc section 4, reference ``contrast/loss.py``):

- ``pos`` = mean of ``s`` over all positive pairs;
- ``neg`` = for each student cell, the ``num_negatives`` most similar non-positive teacher cells, the most similar
  one dropped (a likely false negative) and the others averaged; then averaged over student cells;
- ``loss = max(0, margin - 2 * pos_weight * pos + 2 * neg)``.

The reference writes this as ``MarginRankingLoss(margin)(neg_logit, pos_weight * pos_logit, 1)`` on logits
``-2 * s``; the two are equal. With unit vectors and ``margin=100`` the hinge never switches off.

Symbols used in this module:
    B: images in the batch.
    C: embedding channels.
    Hs, Ws, Ls = Hs * Ws: student map size and cell count. Ht, Wt, Lt likewise for the teacher.
    G: global views per image. N: local views per image.
    Q: entries of the inter-image negative queue.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clove_timm.matching import positive_mask

__all__ = ["CLoVELoss", "clove_pair_loss"]

Objective = Literal["ranking", "l2"]
NegativeSource = Literal["intra", "inter", "inter_avg"]

# Added to the positive count before dividing, as the reference does; it also makes "no positive" give pos = 0.
_POS_COUNT_EPS = 1e-6


def _check_map(x: torch.Tensor, name: str) -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")


def _fp32_disabled_autocast(device_type: str) -> torch.autocast:
    return torch.autocast(device_type=device_type, enabled=False)


def _positive_term(similarity: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Mean similarity over positive pairs.

    Args:
        similarity: (..., Ls, Lt) cosine similarities.
        pos: (..., Ls, Lt) boolean positive mask.

    Returns:
        (...) mean of the positive similarities; 0 where there is no positive pair.
    """
    total = torch.where(pos, similarity, 0.0).sum(dim=(-2, -1))
    return total / (pos.sum(dim=(-2, -1)) + _POS_COUNT_EPS)


def _hard_negative_term(similarity: torch.Tensor, negative: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Mean similarity to the hard negatives, the hardest of each student cell dropped.

    For each student cell, the ``num_negatives`` most similar candidates (entries where ``negative`` is True) are
    taken and the most similar of them is dropped (reference: ``topk(10)`` then ``[1:]``). The reference fills
    non-candidates with ``+inf`` logits, so a cell with fewer than ``num_negatives`` candidates puts ``inf`` in the
    mean and silently zeroes the image's loss (method doc section 4). Here a cell averages the candidates it has
    (after dropping its hardest), cells without any are left out of the mean over cells, and an image with no
    negative anywhere gets a negative term of 0. Loss and gradients stay finite; with enough candidates the result is
    exactly the reference's.

    Args:
        similarity: (..., Ls, K) similarity of each student cell to each candidate.
        negative: (..., Ls, K) boolean, True where the candidate may serve as a negative.
        num_negatives: candidates taken per cell before dropping the hardest.

    Returns:
        (...) mean hard-negative similarity.
    """
    k = min(num_negatives, similarity.shape[-1])
    masked = similarity.masked_fill(~negative, float("-inf"))
    top, _ = torch.topk(masked, k, dim=-1)  # (..., Ls, k), most similar first
    available = negative.sum(dim=-1, keepdim=True)  # (..., Ls, 1)
    rank = torch.arange(k, device=similarity.device)
    used = (rank >= 1) & (rank < available)  # drop rank 0; ranks past the candidates are -inf fillers
    used_count = used.sum(dim=-1)  # (..., Ls)
    per_cell = torch.where(used, top, 0.0).sum(dim=-1) / used_count.clamp_min(1)
    has_negatives = used_count > 0
    cells_with_negatives = has_negatives.sum(dim=-1)  # (...)
    total = torch.where(has_negatives, per_cell, 0.0).sum(dim=-1)
    return total / cells_with_negatives.clamp_min(1)


def _off_diagonal(x: torch.Tensor) -> torch.Tensor:
    """(V, V, ...) -> (V*(V-1), ...): the entries with row != column, row-major.

    Reshapes only (no boolean indexing, which would wait for the device to count the selected entries): in the
    flattened matrix the diagonal entries are every (V+1)-th, so dropping the first entry and viewing the rest as
    rows of V+1 puts each remaining diagonal entry in the last column.
    """
    v, rest = x.shape[0], x.shape[2:]
    if v == 1:
        return x.flatten(0, 1)[:0]
    return x.flatten(0, 1)[1:].reshape(v - 1, v + 1, *rest)[:, :v].reshape(v * (v - 1), *rest)


def _pair_losses(
    pos_sim: torch.Tensor,
    neg_sim: torch.Tensor,
    *,
    pos_weight: float,
    margin: float,
) -> torch.Tensor:
    """Ranking hinge ``max(0, margin - 2 * pos_weight * pos + 2 * neg)`` for each element."""
    # Bracketed so the O(1) terms are combined before the (possibly large) margin: keeps float32 rounding at 100.
    return F.relu(margin + (2.0 * neg_sim - 2.0 * pos_weight * pos_sim))


def _l2_losses(similarity: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """BYOL normalized-dot-product loss ``||q - k||^2 = 2 - 2 s`` averaged over positive pairs (paper Table 8)."""
    total = torch.where(pos, 2.0 - 2.0 * similarity, 0.0).sum(dim=(-2, -1))
    return total / (pos.sum(dim=(-2, -1)) + _POS_COUNT_EPS)


def _validate_hparams(pos_ratio: float, pos_weight: float, margin: float, num_negatives: int) -> None:
    if not pos_ratio > 0:
        raise ValueError(f"pos_ratio must be positive, got {pos_ratio}")
    if not math.isfinite(pos_weight) or not math.isfinite(margin):
        raise ValueError(f"pos_weight and margin must be finite, got {pos_weight} and {margin}")
    if num_negatives < 2:
        raise ValueError(f"num_negatives must be >= 2 (the hardest one is dropped), got {num_negatives}")


def clove_pair_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    *,
    pos_ratio: float = 0.7,
    pos_weight: float = 2.0,
    margin: float = 100.0,
    num_negatives: int = 10,
    reduction: Literal["mean", "none"] = "mean",
) -> torch.Tensor:
    """CLoVE ranking loss for one student view predicting one teacher view.

    Defaults are the reference's (``contrast/loss.py``: gamma 2, pos_ratio 0.7, margin 100, top-10) and the paper's
    (T_pos 0.7, Table 11). The loss is computed in float32 whatever the input dtype and autocast state.

    Args:
        student: (B, C, Hs, Ws) contextualized student map, L2-normalized over C.
        teacher: (B, C, Ht, Wt) teacher map, L2-normalized over C.
        student_boxes: (B, 4) crop boxes of the student view, ``(x_ul, y_ul, x_lr, y_lr)``.
        teacher_boxes: (B, 4) crop boxes of the teacher view.
        pos_ratio: positive-pair distance threshold in bin diagonals.
        pos_weight: weight of the positive term (the paper's lambda).
        margin: ranking margin.
        num_negatives: hard negatives taken per student cell, the hardest of which is then dropped.
        reduction: ``"mean"`` for the batch mean, ``"none"`` for the (B,) per-image losses.

    Returns:
        Scalar batch-mean loss, or (B,) per-image losses.
    """
    _check_map(student, "student")
    _check_map(teacher, "teacher")
    _validate_hparams(pos_ratio, pos_weight, margin, num_negatives)
    if student.shape[:2] != teacher.shape[:2]:
        raise ValueError(
            f"student (B, C)={tuple(student.shape[:2])} and teacher (B, C)={tuple(teacher.shape[:2])} must agree"
        )
    if student_boxes.shape[0] != student.shape[0] or teacher_boxes.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"boxes must have one row per image: student_boxes {tuple(student_boxes.shape)}, teacher_boxes "
            f"{tuple(teacher_boxes.shape)} for batch {student.shape[0]}"
        )
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    with _fp32_disabled_autocast(student.device.type):
        pos = positive_mask(
            student_boxes, teacher_boxes, tuple(student.shape[-2:]), tuple(teacher.shape[-2:]), pos_ratio=pos_ratio
        )  # (B, Ls, Lt)
        s = student.float().flatten(2).transpose(1, 2)  # (B, C, Hs, Ws) -> (B, Ls, C)
        t = teacher.float().flatten(2)  # (B, C, Ht, Wt) -> (B, C, Lt)
        similarity = torch.bmm(s, t)  # (B, Ls, Lt)
        losses = _pair_losses(
            _positive_term(similarity, pos),
            _hard_negative_term(similarity, ~pos, num_negatives),
            pos_weight=pos_weight,
            margin=margin,
        )
    return losses.mean() if reduction == "mean" else losses


class CLoVELoss(nn.Module):
    """The multi-crop CLoVE objective over all view pairs of a batch.

    Pairs views as the reference's ``TripletLoss.forward`` does: each global student view predicts every OTHER
    global teacher view, and each local student view predicts every global teacher view; the loss is the mean of
    the per-pair batch means (2 * (1 + 6) = 14 terms for 2 global and 6 local views). All pairs are computed in two
    batched similarity products (global and local students) instead of one call per pair; since every pair has the
    same batch size, the mean over pairs equals the mean over all (pair, image) losses.

    Ablations of the paper behind arguments:

    - ``objective="l2"``: BYOL normalized dot product ``2 - 2 s`` averaged over positive pairs (Table 8), no negatives.
    - ``negatives="inter"`` / ``"inter_avg"``: hard negatives come from a queue of ``queue_size`` teacher features of
      other images (Table 10), filled by :meth:`enqueue` with one random teacher cell per image (``inter``) or the
      average-pooled teacher map (``inter_avg``) per step; the student cells rank their positives above the queue's
      hard negatives (the same top-k with the hardest dropped). The queue starts with random unit vectors, as MoCo's
      does. It is a buffer, so it is saved with the module's state dict.

    Args:
        pos_ratio: positive-pair distance threshold (paper Table 11: 0.7).
        pos_weight: the paper's lambda (reference ``gamma=2``).
        margin: ranking margin (reference 100).
        num_negatives: hard negatives per student cell before the hardest is dropped (reference 10).
        objective: ``"ranking"`` (the paper's default) or ``"l2"``.
        negatives: ``"intra"`` (default, the same image's other teacher cells), ``"inter"`` or ``"inter_avg"``.
        queue_size: entries of the inter-image queue (paper: 16,384).
        embed_dim: channels C of the maps; needed to size the queue.
    """

    def __init__(
        self,
        *,
        pos_ratio: float = 0.7,
        pos_weight: float = 2.0,
        margin: float = 100.0,
        num_negatives: int = 10,
        objective: Objective = "ranking",
        negatives: NegativeSource = "intra",
        queue_size: int = 16384,
        embed_dim: int = 256,
    ) -> None:
        super().__init__()
        _validate_hparams(pos_ratio, pos_weight, margin, num_negatives)
        if objective not in ("ranking", "l2"):
            raise ValueError(f"objective must be 'ranking' or 'l2', got {objective!r}")
        if negatives not in ("intra", "inter", "inter_avg"):
            raise ValueError(f"negatives must be 'intra', 'inter' or 'inter_avg', got {negatives!r}")
        self.pos_ratio = pos_ratio
        self.pos_weight = pos_weight
        self.margin = margin
        self.num_negatives = num_negatives
        self.objective = objective
        self.negatives = negatives
        if negatives != "intra":
            if queue_size < num_negatives:
                raise ValueError(f"queue_size ({queue_size}) must be at least num_negatives ({num_negatives})")
            self.register_buffer("queue", F.normalize(torch.randn(queue_size, embed_dim), dim=1))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        else:
            self.queue = None

    def extra_repr(self) -> str:
        return (
            f"objective={self.objective}, negatives={self.negatives}, pos_ratio={self.pos_ratio}, "
            f"pos_weight={self.pos_weight}, margin={self.margin}, num_negatives={self.num_negatives}"
        )

    def forward(
        self,
        student_global: torch.Tensor,
        student_local: torch.Tensor | None,
        teacher_global: torch.Tensor,
        global_boxes: torch.Tensor,
        local_boxes: torch.Tensor | None = None,
        *,
        return_parts: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Mean loss over all (student view, teacher view) pairs.

        Views are stacked view-major on the batch axis, as the backbone sees them: row ``v * B + b`` is view ``v``
        of image ``b``.

        Args:
            student_global: (G*B, C, Hs, Ws) student maps of the global views, L2-normalized over C.
            student_local: (N*B, C, Hl, Wl) student maps of the local views, or None when N = 0.
            teacher_global: (G*B, C, Ht, Wt) teacher maps of the global views, L2-normalized over C.
            global_boxes: (G, B, 4) boxes of the global views.
            local_boxes: (N, B, 4) boxes of the local views, or None when N = 0.
            return_parts: also return the parts of the loss, detached, for logging: ``global`` and ``local`` (mean
                loss of the global-global and local-global pairs), ``pos_similarity`` and ``neg_similarity`` (mean
                positive and hard-negative cosine similarity over all pairs; no negatives for the l2 objective).

        Returns:
            Scalar loss (float32), and with ``return_parts`` the dict of scalar parts.
        """
        _check_map(student_global, "student_global")
        _check_map(teacher_global, "teacher_global")
        if global_boxes.ndim != 3 or global_boxes.shape[-1] != 4:
            raise ValueError(f"global_boxes must have shape (G, B, 4), got {tuple(global_boxes.shape)}")
        num_global, batch = global_boxes.shape[:2]
        if num_global < 1 or (num_global < 2 and student_local is None):
            raise ValueError(f"need 2 or more global views, or local views, to form pairs; got G={num_global}")
        for name, x in (("student_global", student_global), ("teacher_global", teacher_global)):
            if x.shape[0] != num_global * batch:
                raise ValueError(f"{name} has {x.shape[0]} rows, expected G*B = {num_global}*{batch}")
        if (student_local is None) != (local_boxes is None):
            raise ValueError("student_local and local_boxes must be given together")

        with _fp32_disabled_autocast(student_global.device.type):
            teacher = teacher_global.float()
            terms = {
                "global": self._view_losses(
                    student_global.float(), teacher, global_boxes, global_boxes, same_views=True
                )
            }
            if student_local is not None:
                _check_map(student_local, "student_local")
                if local_boxes.ndim != 3 or local_boxes.shape[1:] != (batch, 4):
                    raise ValueError(f"local_boxes must have shape (N, {batch}, 4), got {tuple(local_boxes.shape)}")
                if student_local.shape[0] != local_boxes.shape[0] * batch:
                    raise ValueError(
                        f"student_local has {student_local.shape[0]} rows, "
                        f"expected N*B = {local_boxes.shape[0]}*{batch}"
                    )
                terms["local"] = self._view_losses(
                    student_local.float(), teacher, local_boxes, global_boxes, same_views=False
                )
            loss = torch.cat([losses.flatten() for losses, _, _ in terms.values()]).mean()
            if not return_parts:
                return loss
            # a single global view has no global-global pair: no "global" part then
            parts = {name: losses.detach().mean() for name, (losses, _, _) in terms.items() if losses.numel()}
            parts["pos_similarity"] = torch.cat([pos.detach().flatten() for _, pos, _ in terms.values()]).mean()
            if self.objective == "ranking":
                parts["neg_similarity"] = torch.cat([neg.detach().flatten() for _, _, neg in terms.values()]).mean()
            return loss, parts

    def _view_losses(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        student_boxes: torch.Tensor,
        teacher_boxes: torch.Tensor,
        *,
        same_views: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per-(pair, image) losses of every student view against every teacher view.

        Args:
            student: (Vs*B, C, Hs, Ws) student maps, view-major.
            teacher: (Vt*B, C, Ht, Wt) teacher maps, view-major.
            student_boxes: (Vs, B, 4).
            teacher_boxes: (Vt, B, 4).
            same_views: True when student and teacher views are the same views (global-global): a view is then not
                paired with itself.

        Returns:
            (P, B) losses for the P paired views, the (P, B) mean positive similarity, and the (P, B) mean
            hard-negative similarity (None for the l2 objective).
        """
        num_s, batch = student_boxes.shape[:2]
        num_t = teacher_boxes.shape[0]
        channels, hs, ws = student.shape[1:]
        ht, wt = teacher.shape[-2:]
        s = student.view(num_s, batch, channels, hs * ws).permute(1, 0, 3, 2)  # (Vs*B, C, Hs, Ws) -> (B, Vs, Ls, C)
        s = s.reshape(batch, num_s * hs * ws, channels)  # (B, Vs*Ls, C)
        t = teacher.view(num_t, batch, channels, ht * wt).permute(1, 2, 0, 3)  # (Vt*B, C, Ht, Wt) -> (B, C, Vt, Lt)
        t = t.reshape(batch, channels, num_t * ht * wt)  # (B, C, Vt*Lt)
        similarity = torch.bmm(s, t).view(batch, num_s, hs * ws, num_t, ht * wt)
        similarity = similarity.permute(1, 3, 0, 2, 4)  # (B, Vs, Ls, Vt, Lt) -> (Vs, Vt, B, Ls, Lt)

        s_boxes = student_boxes[:, None].expand(num_s, num_t, batch, 4).reshape(-1, 4)
        t_boxes = teacher_boxes[None].expand(num_s, num_t, batch, 4).reshape(-1, 4)
        pos = positive_mask(s_boxes, t_boxes, (hs, ws), (ht, wt), pos_ratio=self.pos_ratio)
        pos = pos.view(num_s, num_t, batch, hs * ws, ht * wt)  # (Vs*Vt*B, Ls, Lt) -> (Vs, Vt, B, Ls, Lt)

        if same_views:
            similarity, pos = _off_diagonal(similarity), _off_diagonal(pos)  # (Vs*(Vs-1), B, Ls, Lt)
        else:
            similarity, pos = similarity.flatten(0, 1), pos.flatten(0, 1)  # (Vs*Vt, B, Ls, Lt)

        pos_sim = _positive_term(similarity, pos)
        if self.objective == "l2":
            return _l2_losses(similarity, pos), pos_sim, None
        if self.negatives == "intra":
            neg_sim = _hard_negative_term(similarity, ~pos, self.num_negatives)
        else:
            # (Vs*Ls*B... ) student cells against the queue: (B, Vs*Ls, C) @ (C, Q) -> (B, Vs, Ls, Q)
            queue_sim = (s @ self.queue.float().T).view(batch, num_s, hs * ws, -1)
            neg = _hard_negative_term(queue_sim, torch.ones_like(queue_sim, dtype=torch.bool), self.num_negatives)
            neg = neg.T  # (B, Vs) -> (Vs, B)
            pairs_per_student = num_t - 1 if same_views else num_t
            neg_sim = neg.repeat_interleave(pairs_per_student, dim=0)  # one value per (student view, teacher view)
        return _pair_losses(pos_sim, neg_sim, pos_weight=self.pos_weight, margin=self.margin), pos_sim, neg_sim

    @torch.no_grad()
    def queue_candidates(self, teacher_global: torch.Tensor, num_global: int, generator: torch.Generator | None = None):
        """Teacher features of this step to push into the inter-image queue, one per image.

        Args:
            teacher_global: (G*B, C, Ht, Wt) teacher maps, L2-normalized over C, view-major.
            num_global: G.
            generator: random source for ``negatives="inter"`` (which cell of which global view).

        Returns:
            (B, C) unit vectors: one random teacher cell per image (``inter``) or the average-pooled teacher map of
            the image's global views, renormalized (``inter_avg``).
        """
        if self.queue is None:
            raise RuntimeError("queue_candidates() needs negatives='inter' or 'inter_avg'")
        batch = teacher_global.shape[0] // num_global
        channels = teacher_global.shape[1]
        cells = teacher_global.float().view(num_global, batch, channels, -1).permute(1, 0, 3, 2)
        cells = cells.reshape(batch, -1, channels)  # (G*B, C, Ht, Wt) -> (B, G*Lt, C)
        if self.negatives == "inter_avg":
            return F.normalize(cells.mean(dim=1), dim=1)
        index = torch.randint(cells.shape[1], (batch,), generator=generator, device="cpu").to(cells.device)
        return cells[torch.arange(batch, device=cells.device), index]

    @torch.no_grad()
    def enqueue(self, features: torch.Tensor) -> None:
        """Push features (already gathered across processes by the caller) into the queue, oldest out first.

        Args:
            features: (K, C) unit vectors, K <= Q.
        """
        if self.queue is None:
            raise RuntimeError("enqueue() needs negatives='inter' or 'inter_avg'")
        size = self.queue.shape[0]
        if features.ndim != 2 or features.shape[1] != self.queue.shape[1] or features.shape[0] > size:
            raise ValueError(
                f"features must have shape (K <= {size}, {self.queue.shape[1]}), got {tuple(features.shape)}"
            )
        index = (self.queue_ptr + torch.arange(features.shape[0], device=self.queue.device)) % size
        self.queue[index] = features.to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + features.shape[0]) % size)
