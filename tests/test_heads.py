"""Projector and predictor heads."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clove_timm.heads import Predictor, Projector


def test_projector_layout_and_shapes():
    projector = Projector(16, 32, 8)
    out = projector(torch.randn(4, 16, 3, 5))
    assert out.shape == (4, 8, 3, 5)
    assert projector.linear1.bias is None and projector.linear2.bias is None
    assert projector.bn1.affine and not projector.bn2.affine
    # Final BN without affine, in train mode: every channel has zero mean and unit variance over (B, H, W).
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(8), atol=1e-5, rtol=0)
    assert sorted(projector.state_dict()) == sorted(
        [
            "linear1.weight",
            "bn1.weight",
            "bn1.bias",
            "bn1.running_mean",
            "bn1.running_var",
            "bn1.num_batches_tracked",
            "linear2.weight",
            "bn2.running_mean",
            "bn2.running_var",
            "bn2.num_batches_tracked",
        ]
    )


def test_projector_is_per_location():
    projector = Projector(6, 12, 4).eval()
    x = torch.randn(2, 6, 3, 3)
    out = projector(x)
    # A 1x1-conv MLP: the output at one location depends only on the input at that location.
    single = projector(x[:, :, 1:2, 2:3])
    torch.testing.assert_close(out[:, :, 1:2, 2:3], single)


@pytest.mark.parametrize("return_attention", [False, True])
def test_reference_mode_equals_multihead_attention(return_attention):
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():  # non-zero biases so that their layout is checked too
        mha.in_proj_bias.normal_()
        mha.out_proj.bias.normal_()
    predictor = Predictor(32, 4, normalize_qk=False)
    predictor.load_state_dict(mha.state_dict())  # the reference checkpoint's self_attn.* keys load unchanged
    x = torch.randn(3, 32, 5, 4)
    tokens = x.flatten(2).transpose(1, 2)
    expected, expected_weights = mha(tokens, tokens, tokens, average_attn_weights=False)
    expected = expected.transpose(1, 2).reshape(3, 32, 5, 4)
    if return_attention:
        out, weights = predictor(x, return_attention=True)
        torch.testing.assert_close(weights, expected_weights, atol=1e-6, rtol=1e-5)
    else:
        out = predictor(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_nmhsa_by_hand():
    dim, heads = 8, 2
    predictor = Predictor(dim, heads, normalize_qk=True, temperature=0.2)
    with torch.no_grad():
        predictor.in_proj_bias.normal_()
    x = torch.randn(2, dim, 2, 3)
    tokens = x.flatten(2).transpose(1, 2)  # (B, L, C)
    w_q, w_k, w_v = predictor.in_proj_weight.chunk(3)
    b_q, b_k, b_v = predictor.in_proj_bias.chunk(3)
    head_outputs = []
    for h in range(heads):
        rows = slice(h * 4, (h + 1) * 4)
        q = F.normalize(tokens @ w_q[rows].T + b_q[rows], dim=-1)
        k = F.normalize(tokens @ w_k[rows].T + b_k[rows], dim=-1)
        v = tokens @ w_v[rows].T + b_v[rows]
        cos = q @ k.transpose(1, 2)
        assert cos.abs().max() <= 1 + 1e-6
        head_outputs.append(torch.softmax(cos / 0.2, dim=-1) @ v)
    expected = predictor.out_proj(torch.cat(head_outputs, dim=-1)).transpose(1, 2).reshape(2, dim, 2, 3)
    out, weights = predictor(x, return_attention=True)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(predictor(x), expected, atol=1e-5, rtol=1e-5)  # fused path, no weights
    assert weights.shape == (2, heads, 6, 6)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, heads, 6))


def test_predictor_scale():
    assert Predictor(256, 8, normalize_qk=True, temperature=0.2).scale == pytest.approx(5.0)
    assert Predictor(256, 8, normalize_qk=False).scale == pytest.approx(1 / math.sqrt(32))


def test_predictor_errors_name_the_problem():
    with pytest.raises(ValueError, match="divisible"):
        Predictor(30, 8)
    with pytest.raises(ValueError, match="temperature"):
        Predictor(32, 4, temperature=0.0)
    with pytest.raises(ValueError, match=r"\(B, 32, H, W\)"):
        Predictor(32, 4)(torch.randn(2, 16, 3, 3))
