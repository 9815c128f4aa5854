"""Collapse monitor: statistics of L2-normalized features that fall when a self-supervised run collapses.

Symbols used in this module:
    M: feature vectors (e.g. every cell of every teacher map in a batch).
    C: channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["collapse_stats", "effective_rank", "normalized_feature_std"]


def _as_vectors(features: torch.Tensor) -> torch.Tensor:
    if features.ndim == 4:
        return (
            features.detach().float().flatten(2).transpose(1, 2).reshape(-1, features.shape[1])
        )  # (B, C, H, W) -> (M, C)
    if features.ndim == 2:
        return features.detach().float()
    raise ValueError(f"features must have shape (M, C) or (B, C, H, W), got {tuple(features.shape)}")


def normalized_feature_std(features: torch.Tensor) -> torch.Tensor:
    """Mean over channels of the per-channel std of the L2-normalized features.

    For features spread over the unit sphere it is about ``1 / sqrt(C)``; it falls to 0 when every vector is the
    same (the collapse statistic of SimSiam/BYOL-style runs).

    Args:
        features: (M, C) vectors or (B, C, H, W) maps.

    Returns:
        Scalar tensor.
    """
    vectors = F.normalize(_as_vectors(features), dim=1)
    return vectors.std(dim=0).mean()


def effective_rank(features: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Effective rank (Roy & Vetterli, 2007): ``exp`` of the entropy of the normalized singular values.

    Between 1 (all vectors on one line) and ``min(M, C)`` (isotropic features). The features are centred first, so
    that a shared offset does not count as a dimension.

    Args:
        features: (M, C) vectors or (B, C, H, W) maps.
        eps: guards ``log(0)``.

    Returns:
        Scalar tensor.
    """
    vectors = _as_vectors(features)
    vectors = vectors - vectors.mean(dim=0, keepdim=True)
    singular = torch.linalg.svdvals(vectors)
    total = singular.sum()
    if total <= eps:
        return torch.ones((), device=vectors.device)
    p = singular / total
    return torch.exp(-(p * torch.log(p + eps)).sum())


def collapse_stats(features: torch.Tensor, *, min_std_ratio: float = 0.1) -> dict[str, float]:
    """Both statistics and an alarm for logging.

    Args:
        features: (M, C) vectors or (B, C, H, W) maps.
        min_std_ratio: alarm when the normalized std falls below this fraction of ``1 / sqrt(C)``.

    Returns:
        ``{"feature_std": ..., "feature_std_ratio": std * sqrt(C), "effective_rank": ..., "collapsed": 0.0 or 1.0}``.
    """
    channels = _as_vectors(features).shape[1]
    std = normalized_feature_std(features).item()
    ratio = std * math.sqrt(channels)
    return {
        "feature_std": std,
        "feature_std_ratio": ratio,
        "effective_rank": effective_rank(features).item(),
        "collapsed": float(ratio < min_std_ratio),
    }
