"""Collapse monitor statistics."""

from __future__ import annotations

import math

import pytest
import torch

from clove_timm.monitor import collapse_stats, effective_rank, normalized_feature_std


def test_constant_features_raise_the_alarm():
    features = torch.ones(64, 32) * torch.linspace(0.5, 2, 32)
    stats = collapse_stats(features)
    assert stats["feature_std"] == pytest.approx(0.0, abs=1e-6)
    assert stats["effective_rank"] == pytest.approx(1.0)
    assert stats["collapsed"] == 1.0


def test_gaussian_features_are_near_full_rank_and_spread():
    g = torch.Generator().manual_seed(0)
    features = torch.randn(4096, 32, generator=g)
    stats = collapse_stats(features)
    assert stats["feature_std_ratio"] == pytest.approx(1.0, abs=0.05)  # std ~ 1/sqrt(C) on the sphere
    assert stats["effective_rank"] > 0.95 * 32
    assert stats["collapsed"] == 0.0


def test_rank_one_features_have_effective_rank_one():
    g = torch.Generator().manual_seed(1)
    direction = torch.randn(16, generator=g)
    features = torch.randn(256, 1, generator=g) * direction
    assert effective_rank(features).item() == pytest.approx(1.0, abs=1e-3)


def test_maps_are_read_per_location():
    g = torch.Generator().manual_seed(2)
    maps = torch.randn(8, 16, 4, 4, generator=g)
    vectors = maps.permute(0, 2, 3, 1).reshape(-1, 16)
    assert normalized_feature_std(maps).item() == pytest.approx(normalized_feature_std(vectors).item())
    assert effective_rank(maps).item() == pytest.approx(effective_rank(vectors).item(), rel=1e-5)
    k_dims = 4  # isotropic in a 4-dimensional subspace: effective rank close to 4
    sub = torch.randn(4096, k_dims, generator=g) @ torch.linalg.qr(torch.randn(16, k_dims, generator=g))[0].T
    assert effective_rank(sub).item() == pytest.approx(k_dims, rel=0.05)
    assert math.isfinite(normalized_feature_std(sub).item())


def test_bad_shape_is_named():
    with pytest.raises(ValueError, match=r"\(M, C\)"):
        collapse_stats(torch.zeros(3, 4, 5))
