"""CLoVE heads: the per-location projector and the self-attention predictor.

Symbols used in this module:
    B: batch size.
    D: backbone channels (2048 for ResNet-50).
    C: embedding channels (256).
    H, W, L = H * W: feature-map size and number of tokens.
    h: attention heads, d: channels per head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Predictor", "Projector"]


class Projector(nn.Module):
    """Per-location MLP as 1x1 convolutions: conv -> BN -> ReLU -> conv -> BN without affine.

    Defaults from the method doc section 2 (reference ``MLP2d``: 2048 -> 4096 -> 256). Sub-module names follow the
    reference (``linear1``, ``bn1``, ``linear2``, ``bn2``) so a reference projector state dict loads unchanged.

    Args:
        in_dim: backbone channels D.
        hidden_dim: hidden channels.
        out_dim: embedding channels C.
    """

    def __init__(self, in_dim: int = 2048, hidden_dim: int = 4096, out_dim: int = 256) -> None:
        super().__init__()
        self.linear1 = nn.Conv2d(in_dim, hidden_dim, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.linear2 = nn.Conv2d(hidden_dim, out_dim, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project a backbone map.

        Args:
            x: (B, D, H, W) backbone features.

        Returns:
            (B, C, H, W) projected map (not normalized).
        """
        return self.bn2(self.linear2(self.relu(self.bn1(self.linear1(x)))))


class Predictor(nn.Module):
    """Normalized multi-head self-attention (NMHSA) over the tokens of a projected map.

    Paper (section 3, Table 9): ``h`` heads, each with its own W_q, W_k, W_v in R^{C x d}; queries and keys are
    L2-normalized per head, scores are ``cos(q, k) / temperature``, softmax, times V; the heads are concatenated and
    mapped back to C by a linear layer. No positional encoding. The reference config records ``attn_temp=0.2``.

    With ``normalize_qk=False`` it computes exactly ``nn.MultiheadAttention(C, h, batch_first=True)`` (scaled dot
    product, ``1 / sqrt(d)``), which is what the released reference code runs (its ``attn_temp`` flag is unused).
    The parameters are named and laid out like ``nn.MultiheadAttention``'s (``in_proj_weight`` rows are
    ``[W_q; W_k; W_v]``, each split into heads of ``d`` rows; ``in_proj_bias``; ``out_proj``), so a reference
    checkpoint's ``self_attn.*`` state dict loads unchanged in either mode.

    Args:
        dim: embedding channels C.
        num_heads: attention heads h (paper: 8).
        normalize_qk: L2-normalize queries and keys per head (NMHSA, the paper) or not (reference code).
        temperature: softmax temperature of the cosine scores when ``normalize_qk`` (paper/reference config: 0.2).
        bias: biases on the input and output projections (``nn.MultiheadAttention`` has them).
    """

    def __init__(
        self,
        dim: int = 256,
        num_heads: int = 8,
        *,
        normalize_qk: bool = True,
        temperature: float = 0.2,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if normalize_qk and not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.normalize_qk = normalize_qk
        self.temperature = temperature
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim)) if bias else None
        self.out_proj = nn.Linear(dim, dim, bias=bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise as ``nn.MultiheadAttention`` does (xavier-uniform input projection, zero biases)."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, normalize_qk={self.normalize_qk}, "
            f"temperature={self.temperature}"
        )

    @property
    def scale(self) -> float:
        """Multiplier of the query-key scores."""
        return 1.0 / self.temperature if self.normalize_qk else self.head_dim**-0.5

    def forward(
        self, x: torch.Tensor, *, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Contextualize every location of a map with the locations similar to it.

        Args:
            x: (B, C, H, W) projected map.
            return_attention: also return the attention weights (for visualisation). Without it the weights are never
                materialised: the fused ``scaled_dot_product_attention`` kernel is used.

        Returns:
            (B, C, H, W) contextualized map (not normalized), and with ``return_attention`` the (B, h, L, L)
            attention weights of every head.
        """
        if x.ndim != 4 or x.shape[1] != self.dim:
            raise ValueError(f"expected a (B, {self.dim}, H, W) map, got {tuple(x.shape)}")
        batch, channels, height, width = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, L, C)
        qkv = F.linear(tokens, self.in_proj_weight, self.in_proj_bias)  # (B, L, 3C)
        qkv = qkv.view(batch, -1, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # -> (3, B, h, L, d)
        q, k, v = qkv.unbind(0)
        if self.normalize_qk:
            q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        if return_attention:
            attention = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)  # (B, h, L, L)
            out = attention @ v
        else:
            attention = None
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, L, d)
        out = self.out_proj(out.transpose(1, 2).reshape(batch, -1, channels))  # (B, h, L, d) -> (B, L, C)
        out = out.transpose(1, 2).reshape(batch, channels, height, width)  # (B, L, C) -> (B, C, H, W)
        return (out, attention) if return_attention else out
