"""JEPA-T: a masked joint-embedding predictive transformer with text fusion and a flow head.

Shapes: B batch, L image tokens, d token size (latent channels * patch**2), D transformer
width, n_buf buffer tokens, S caption tokens, Dt / Du caption token / pooled widths.

One training step (the loss is ``models/loss.py``):
    cond = model.condition(text, drop)                 # the ONE conditioning path
    z    = model(tokens, cond, orders, num_masked)     # encoder -> predictor -> text fusion
    L    = w_flow * flow(z[masked]) + w_jepa * SmoothL1(jepa_head(z[masked]), ema.encode_full)
Sampling (``models/sampler.py``) calls the same ``condition`` and ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

from models.blocks import CrossAttention, transformer_blocks
from models.flow_head import FlowHead
from models.text_encoders import TextEmbeddings


@dataclass
class JEPATConfig:
    """Everything needed to rebuild a JEPA-T model; stored in every checkpoint. The defaults of the
    fields a run may set (``ModelConfig`` in util/config.py reads them from here) are the published
    code's and launch scripts'."""

    token_dim: int  # d: latent channels * patch**2
    seq_len: int  # L: image tokens
    text_token_dim: int  # Dt: width of the caption token states
    text_pooled_dim: int  # Du: width of the pooled caption vector
    width: int = 768  # D
    encoder_depth: int = 12
    predictor_depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    qk_norm: bool = True  # the published launch scripts pass --qk_norm
    flow_width: int = 1024
    flow_depth: int = 6
    flow_prediction: str = "v"  # the head outputs the velocity (v) or the clean token (x)
    t_logit_mean: float | None = None  # flow training times: None = uniform, else logit-normal
    t_logit_std: float = 1.0
    buffer_size: int = 64  # n_buf buffer tokens carrying the pooled condition
    mask_ratio_min: float = 0.7
    mask_ratio_std: float = 0.25
    cond_drop_prob: float = 0.1
    diffusion_batch_mul: int = 4
    proj_dropout: float = 0.1
    attn_dropout: float = 0.1
    fusion: str = "full"  # where text enters; see FUSION_MODES (full: the published code)
    preset: str = ""


@dataclass
class Conditioning:
    """The caption as the network consumes it, made by ``JEPAT.condition`` (one path for training
    and sampling). Shapes for a batch of B captions of S tokens."""

    c: torch.Tensor  # [B,D] pooled condition (buffer tokens and predictor)
    tau: torch.Tensor  # [B,S,D] projected caption tokens (cross-attention keys and values)
    tau_mask: torch.Tensor  # [B,S] bool, True at real tokens
    u: torch.Tensor  # [B,Du] raw pooled vector after null replacement (injected before the heads)

    def first(self, n: int) -> Conditioning:
        """The first ``n`` rows (the conditional half of a guided batch)."""
        return Conditioning(self.c[:n], self.tau[:n], self.tau_mask[:n], self.u[:n])


# full       input-level condition (buffer tokens, predictor) + cross-attention + raw-text injection:
#            what the published code does
# late_only  cross-attention + injection after the predictor only: the paper's task-agnostic backbone,
#            whose CFG rows share one backbone pass when sampling (the shapes recipe's: within noise
#            of full over three seeds there, docs/results.md)
# input_only the input-level condition only;  none: unconditional
FUSION_MODES = ("full", "input_only", "late_only", "none")
_TEXT_TOKENS = ("text_proj", "cross_norm", "cross_attn", "text_inject", "null_token")
UNUSED_BY_FUSION = {
    "full": (),
    "late_only": ("cond_mlp",),
    "input_only": _TEXT_TOKENS,
    "none": ("cond_mlp", "null_pooled") + _TEXT_TOKENS,
}


class JEPAT(nn.Module):
    """Context encoder f_theta, predictor g_phi, text fusion, flow head v_psi and JEPA head."""

    def __init__(self, cfg: JEPATConfig) -> None:
        super().__init__()
        if cfg.fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {cfg.fusion!r}; choose one of {FUSION_MODES}")
        if cfg.width % cfg.num_heads != 0:
            raise ValueError(f"width {cfg.width} is not divisible by num_heads {cfg.num_heads}")
        self.cfg = cfg
        D, L, n_buf = cfg.width, cfg.seq_len, cfg.buffer_size
        # conditioning: pooled u -> c, caption tokens T -> tau; learned null condition for CFG
        self.null_pooled = nn.Parameter(torch.zeros(cfg.text_pooled_dim))
        self.null_token = nn.Parameter(torch.zeros(cfg.text_token_dim))
        self.cond_mlp = nn.Sequential(nn.Linear(cfg.text_pooled_dim, D), nn.SiLU(), nn.Linear(D, D))
        self.text_proj = nn.Linear(cfg.text_token_dim, D)
        # context encoder
        self.z_proj = nn.Linear(cfg.token_dim, D)
        self.z_proj_ln = nn.LayerNorm(D, eps=1e-6)
        self.encoder_pos = nn.Parameter(torch.zeros(1, n_buf + L, D))
        blocks = dict(
            mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm, proj_dropout=cfg.proj_dropout, attn_dropout=cfg.attn_dropout
        )
        self.encoder_blocks = transformer_blocks(D, cfg.encoder_depth, cfg.num_heads, **blocks)
        self.encoder_norm = nn.LayerNorm(D, eps=1e-6)
        # predictor
        self.predictor_embed = nn.Linear(D, D)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, D))
        self.predictor_pos = nn.Parameter(torch.zeros(1, n_buf + L, D))
        self.predictor_blocks = transformer_blocks(D, cfg.predictor_depth, cfg.num_heads, **blocks)
        self.predictor_norm = nn.LayerNorm(D, eps=1e-6)
        # text fusion after the predictor
        self.cross_norm = nn.LayerNorm(D, eps=1e-6)
        self.cross_attn = CrossAttention(D, D, cfg.num_heads, qk_norm=cfg.qk_norm)
        self.text_inject = nn.Linear(cfg.text_pooled_dim, D)
        self.fuse = nn.Linear(2 * D, D)
        # heads
        self.head_pos = nn.Parameter(torch.zeros(1, L, D))
        self.flow_head = FlowHead(cfg.token_dim, D, cfg.flow_width, cfg.flow_depth, cfg.flow_prediction)
        self.jepa_head = nn.Sequential(nn.Linear(D, D), nn.GELU(), nn.Linear(D, D))
        self.initialize_weights()
        # parts the fusion mode never uses stay in the state dict (one layout for every mode) but
        # are frozen: no optimizer state, no DDP search for unused parameters, no weight decay drift
        for name in UNUSED_BY_FUSION[cfg.fusion]:
            getattr(self, name).requires_grad_(False)

    def initialize_weights(self) -> None:
        """The single init: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and flow output."""
        for p in (
            self.encoder_pos,
            self.predictor_pos,
            self.head_pos,
            self.mask_token,
            self.null_pooled,
            self.null_token,
        ):
            nn.init.normal_(p, std=0.02)
        # image positions start from a 2-D sin-cos table (still learned): a short run knows the
        # layout from step 0 instead of having to discover it
        n_buf = self.cfg.buffer_size
        table = sincos_2d(self.cfg.width, self.cfg.seq_len).to(self.head_pos.device)
        with torch.no_grad():
            for p in (self.encoder_pos, self.predictor_pos):
                p[0, n_buf:] = table
            self.head_pos[0] = table

        def init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

        self.apply(init)
        self.flow_head.zero_init_modulation()

    # ---------------------------------------------------------------- conditioning
    def condition(self, text: TextEmbeddings, drop: torch.Tensor) -> Conditioning:
        """The one conditioning path of training and sampling.

        Args:
            text: tokens [B,S,Dt], mask [B,S] bool, pooled [B,Du] from a frozen text encoder.
            drop: [B] bool; True replaces the caption by the learned null condition
                  (CFG dropout in training, the unconditional branch in sampling).
        Returns: Conditioning with c [B,D] (pooled condition), tau [B,S,D] (projected caption tokens),
            tau_mask [B,S] bool, u [B,Du] (raw pooled vector after null replacement).
        """
        B, S, _ = text.tokens.shape
        if self.cfg.fusion == "none":
            drop = torch.ones_like(drop)
        keep = ~drop
        u = torch.where(keep[:, None], text.pooled, self.null_pooled.to(text.pooled.dtype))  # [B,Du]
        null_tokens = torch.zeros_like(text.tokens)
        null_tokens[:, 0] = self.null_token.to(text.tokens.dtype)  # [B,S,Dt]
        tokens = torch.where(keep[:, None, None], text.tokens, null_tokens)  # [B,S,Dt]
        null_mask = torch.zeros_like(text.mask)
        null_mask[:, 0] = True  # [B,S]
        tau_mask = torch.where(keep[:, None], text.mask, null_mask)  # [B,S]
        return Conditioning(
            c=self.cond_mlp(u),  # [B,D]
            tau=self.text_proj(tokens),  # [B,S,D]
            tau_mask=tau_mask,
            u=u,
        )

    # ---------------------------------------------------------------- backbone
    def encode(self, x: torch.Tensor, cond: Conditioning, visible: torch.Tensor | None = None) -> torch.Tensor:
        """Context encoder over [buffer tokens + c] ++ visible tokens.

        Args:
            x: image tokens [B,L,d].
            visible: [B,n_vis] long indices of the visible tokens, or None for all of them.
        Returns: [B, n_buf + n_vis, D] encoder states (buffer first).
        """
        B, L, _ = x.shape
        n_buf, D = self.cfg.buffer_size, self.cfg.width
        h = self.z_proj(x)  # [B,L,D]
        pos = self.encoder_pos.expand(B, -1, -1)  # [B,n_buf+L,D]
        h = h + pos[:, n_buf:]  # [B,L,D]
        if visible is not None:
            h = h.gather(1, visible[..., None].expand(-1, -1, D))  # [B,n_vis,D]
        c = not self.text_free_backbone
        buf = pos[:, :n_buf] + (cond.c[:, None] if c else 0)  # [B,n_buf,D]
        h = self.z_proj_ln(torch.cat([buf, h], dim=1))  # [B,n_buf+n_vis,D]
        for block in self.encoder_blocks:
            h = block(h)
        return self.encoder_norm(h)

    def predict(self, h: torch.Tensor, cond: Conditioning, visible: torch.Tensor | None) -> torch.Tensor:
        """Predictor: scatter encoder states into the full length, mask tokens elsewhere.

        h [B, n_buf + n_vis, D] -> z [B, L, D] (before text fusion).
        """
        B = h.shape[0]
        n_buf, L, D = self.cfg.buffer_size, self.cfg.seq_len, self.cfg.width
        h = self.predictor_embed(h)  # [B,n_buf+n_vis,D]
        if visible is None:
            full = h  # [B,n_buf+L,D]
        else:
            idx = torch.cat([torch.arange(n_buf, device=h.device).expand(B, -1), visible + n_buf], 1)
            full = self.mask_token.to(h.dtype).expand(B, n_buf + L, D)
            full = full.scatter(1, idx[..., None].expand(-1, -1, D), h)  # [B,n_buf+L,D]
        full = full + self.predictor_pos
        if not self.text_free_backbone:
            full = full + cond.c[:, None]  # [B,n_buf+L,D]
        for block in self.predictor_blocks:
            full = block(full)
        return self.predictor_norm(full)[:, n_buf:]  # [B,L,D]

    def fuse_text(self, z: torch.Tensor, cond: Conditioning, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-attention over the caption TOKENS, then raw pooled text injected: [B,n,D] -> [B,n,D].

        Every position is fused on its own (queries only), so ``z`` may hold any subset of the L
        positions: ``positions`` [B,n] long says which (None: all L in order)."""
        if self.cfg.fusion in ("full", "late_only"):
            z = z + self.cross_attn(self.cross_norm(z), cond.tau, cond.tau_mask)  # [B,n,D]
            u = self.text_inject(cond.u)  # [B,D]
        else:
            u = torch.zeros_like(z[:, 0])
        z = self.fuse(torch.cat([z, u[:, None].expand_as(z)], dim=-1))  # [B,n,D]
        return z + (self.head_pos if positions is None else self.head_pos[0][positions])

    @property
    def text_free_backbone(self) -> bool:
        """True when the encoder and predictor never see the caption (late fusion, or none): the
        conditional and null rows of CFG then share one backbone pass."""
        return self.cfg.fusion in ("late_only", "none")

    def backbone(self, x: torch.Tensor, cond: Conditioning, orders: torch.Tensor, num_masked: int) -> torch.Tensor:
        """Encoder and predictor: [B,L,D] states before text fusion (see ``forward``)."""
        visible = orders[:, num_masked:] if num_masked > 0 else None  # [B,n_vis]
        return self.predict(self.encode(x, cond, visible), cond, visible)

    def forward(self, x: torch.Tensor, cond: Conditioning, orders: torch.Tensor, num_masked: int) -> torch.Tensor:
        """x [B,L,d] tokens (masked ones are ignored), orders [B,L] random permutations;
        the first ``num_masked`` of each order are hidden. Returns z [B,L,D] for the flow head."""
        return self.fuse_text(self.backbone(x, cond, orders, num_masked), cond)

    @torch.no_grad()
    def encode_full(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """JEPA targets: encoder states of the full, unmasked sequence, [B,L,D]."""
        return self.encode(x, cond, None)[:, self.cfg.buffer_size :]

    def num_params(self) -> dict[str, int]:
        """Trainable parameter counts by part (the frozen encoders are not part of the model)."""
        parts = {
            "pooled condition (MLP, learned null)": ["null_", "cond_mlp"],
            "caption token projection (feeds the token cross-attention)": ["text_proj"],
            "context encoder": ["z_proj", "encoder_"],
            "predictor": ["predictor_", "mask_token"],
            "token cross-attention": ["cross_"],
            "raw-text injection + fusion": ["text_inject", "fuse"],
            "flow head": ["flow_head", "head_pos"],
            "JEPA head": ["jepa_head"],
        }
        counts = {k: 0 for k in parts}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            key = next(k for k, prefixes in parts.items() if any(name.startswith(s) for s in prefixes))
            counts[key] += p.numel()
        counts["total"] = sum(counts.values())
        return counts


def sincos_2d(width: int, seq_len: int) -> torch.Tensor:
    """[L, width] fixed 2-D sin-cos position table for a square grid of L tokens (raster order):
    half the channels encode the row, half the column, each as sin | cos of geometric frequencies."""
    grid = int(round(math.sqrt(seq_len)))
    if grid * grid != seq_len or width % 4:
        return torch.randn(seq_len, width) * 0.02  # not a square grid: keep the random init
    quarter = width // 4
    freqs = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter))  # [W/4]
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coord in (rows.flatten(), cols.flatten()):
        angles = coord[:, None].double() * freqs[None]  # [L,W/4]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1).float()  # [L,W]


# -------------------------------------------------------------------- masking
def sample_mask_ratio(batch_generator: torch.Generator, ratio_min: float, std: float) -> float:
    """r ~ N(1, std) truncated to [ratio_min, 1], drawn on the host (no device sync)."""
    a, b = torch.tensor((ratio_min - 1.0) / std), torch.tensor(0.0)
    lo, hi = torch.special.ndtr(a), torch.special.ndtr(b)
    u = lo + (hi - lo) * torch.rand((), generator=batch_generator)
    return float(1.0 + std * torch.special.ndtri(u))


def random_orders(
    batch: int, seq_len: int, device: torch.device, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, L] independent random permutations, by argsort of uniform noise on the device."""
    return torch.rand(batch, seq_len, device=device, generator=generator).argsort(dim=1)


def mask_from_orders(orders: torch.Tensor, num_masked: int) -> torch.Tensor:
    """Boolean mask [B,L], True where hidden (the first ``num_masked`` of each order)."""
    mask = torch.zeros_like(orders, dtype=torch.bool)
    return mask.scatter(1, orders[:, :num_masked], True)


# -------------------------------------------------------------------- presets
def _preset(name: str, **arch) -> Callable[..., JEPAT]:
    def build(**kwargs) -> JEPAT:
        return JEPAT(JEPATConfig(preset=name, **{**arch, **kwargs}))

    build.__name__ = f"jepat_{name}"
    build.arch = arch
    return build


JEPAT_MODELS: dict[str, Callable[..., JEPAT]] = {
    "tiny": _preset(
        "tiny",
        width=192,
        encoder_depth=3,
        predictor_depth=3,
        num_heads=3,
        flow_width=256,
        flow_depth=3,
        buffer_size=4,
        proj_dropout=0.0,
        attn_dropout=0.0,
    ),
    "base": _preset(
        "base", width=768, encoder_depth=12, predictor_depth=12, num_heads=12, flow_width=1024, flow_depth=6
    ),
    "large": _preset(
        "large", width=1024, encoder_depth=24, predictor_depth=24, num_heads=16, flow_width=1280, flow_depth=8
    ),
    "huge": _preset(
        "huge", width=1280, encoder_depth=32, predictor_depth=32, num_heads=16, flow_width=1536, flow_depth=12
    ),
}


def build_model(preset: str, **kwargs) -> JEPAT:
    """A model from the preset registry; kwargs (token_dim, seq_len, text dims, ...) override it."""
    if preset not in JEPAT_MODELS:
        raise ValueError(f"unknown model preset {preset!r}; choose one of {sorted(JEPAT_MODELS)}")
    return JEPAT_MODELS[preset](**kwargs)


def config_dict(model: JEPAT) -> dict:
    return asdict(model.cfg)
