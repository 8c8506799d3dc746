"""Building blocks shared by the JEPA-T transformer and its flow head.

Self-attention blocks come from timm (``timm.models.vision_transformer.Block``, which routes
attention through ``F.scaled_dot_product_attention``); what timm does not have in the form we
need is here: a cross-attention over padded caption tokens, a sinusoidal timestep embedder and
the adaLN modulation helper.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def transformer_blocks(
    width: int, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, proj_dropout: float, attn_dropout: float
) -> nn.ModuleList:
    """``depth`` pre-norm ViT blocks from timm (SDPA attention, optional qk-norm)."""
    return nn.ModuleList(
        [
            Block(
                width,
                num_heads,
                mlp_ratio=mlp_ratio,
                qkv_bias=True,
                qk_norm=qk_norm,
                proj_drop=proj_dropout,
                attn_drop=attn_dropout,
                norm_layer=nn.LayerNorm,
            )
            for _ in range(depth)
        ]
    )


class CrossAttention(nn.Module):
    """Queries from image tokens, keys/values from caption token states, padding masked out.

    Args:
        dim: width of the queries and of the output.
        context_dim: width of the caption token states (already projected or raw).
        num_heads: attention heads; ``dim`` must be divisible by it.
        qk_norm: LayerNorm on per-head queries and keys.
    """

    def __init__(self, dim: int, context_dim: int, num_heads: int, qk_norm: bool = False) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"cross-attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(context_dim, 2 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor) -> torch.Tensor:
        """x [B,L,D], context [B,S,Dc], context_mask [B,S] bool (True = real token) -> [B,L,D].

        Every row of ``context_mask`` must hold at least one True (the null condition does).
        """
        B, L, D = x.shape
        S = context.shape[1]
        q = self.q(x).view(B, L, self.num_heads, self.head_dim).transpose(1, 2)  # [B,H,L,hd]
        kv = self.kv(context).view(B, S, 2, self.num_heads, self.head_dim)  # [B,S,2,H,hd]
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)  # [B,H,S,hd] x2
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = context_mask[:, None, None, :]  # [B,1,1,S]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # [B,H,L,hd]
        out = out.transpose(1, 2).reshape(B, L, D)  # [B,L,D]
        return self.proj(out)


class TimestepEmbedder(nn.Module):
    """Scalar flow time t in [0, 1] -> vector, by sinusoidal features and a two-layer MLP."""

    def __init__(self, width: int, frequency_dim: int = 256, time_scale: float = 1000.0) -> None:
        super().__init__()
        self.frequency_dim = frequency_dim
        self.time_scale = time_scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def sinusoidal(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, frequency_dim] (cos | sin features, periods up to 10^4)."""
        half = self.frequency_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * self.time_scale)[:, None] * freqs[None]  # [N,half]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [N,2*half]

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t [N] -> [N, width]."""
        return self.mlp(self.sinusoidal(t).to(self.mlp[0].weight.dtype))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x * (1 + scale) + shift, all [N, D]."""
    return x * (1 + scale) + shift
