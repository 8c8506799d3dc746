"""Building blocks shared by the JEPA-T transformer and its flow head.

The self-attention block is timm's pre-norm ViT block (``timm.models.vision_transformer.Block``:
the same submodules, parameter names, dropout order and SDPA call; tests/test_model.py checks that
both give the same outputs and gradients from the same weights). It is written out here because
importing timm costs about 2 s of CPU in every process (it loads its model zoo, torchvision and
torch._dynamo), paid by every torchrun worker and test process for 60 lines. Also here: a
cross-attention over padded caption tokens, a sinusoidal timestep embedder and the adaLN helper.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` that also takes a float32 input when its weights are gathered in bf16 (FSDP2
    with bf16 parameters, where the residual stream stays float32): the weights are upcast for it.
    Every other case is ``nn.LayerNorm`` itself, so DDP and one-process numerics are unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if x.dtype == torch.float32 and w is not None and w.dtype != torch.float32:
            w, b = w.float(), (b.float() if b is not None else None)
        return F.layer_norm(x, self.normalized_shape, w, b, self.eps)


class SelfAttention(nn.Module):
    """Multi-head self-attention (timm's ``Attention``): fused qkv, optional per-head LayerNorm on
    queries and keys, ``F.scaled_dot_product_attention``, output projection and dropout."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, attn_drop: float, proj_drop: float
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]."""
        B, N, D = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [B,H,N,hd] x3
        q, k = self.q_norm(q), self.k_norm(k)
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, D)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout (timm's ``Mlp``)."""

    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = SelfAttention(dim, num_heads, qkv_bias, qk_norm, attn_drop, proj_drop)
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B,N,D] -> [B,N,D]."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def transformer_blocks(
    width: int, depth: int, num_heads: int, mlp_ratio: float, qk_norm: bool, proj_dropout: float, attn_dropout: float
) -> nn.ModuleList:
    """``depth`` pre-norm ViT blocks (SDPA attention, optional qk-norm)."""
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
