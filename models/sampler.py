"""MAR-style iterative unmasking for JEPA-T, with classifier-free guidance on the flow velocity.

All L tokens start hidden, in a random order per image. Step k of K runs the conditioning
(once per batch, not per step), encoder, predictor and text fusion on the tokens known so far,
with the conditional and null-condition rows in one batch (with late fusion the encoder and
predictor never see the caption, so the two rows share one backbone pass and only the text fusion
and the flow head run twice; text fusion runs only where tokens are revealed); floor(L * cos(pi/2 * k/K)) tokens
stay hidden after step k (at least one fewer each step); the tokens that leave the mask are
drawn by integrating the flow head's ODE from temperature-scaled noise.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from models.flow_head import ODE_SOLVERS, sample_tokens_from_head
from models.jepat import JEPAT, random_orders
from models.settings import setting
from models.text_encoders import TextEmbeddings

GUIDANCE_SCHEDULES = ("constant", "linear")
StepHook = Callable[[int, torch.Tensor, torch.Tensor], None]  # (step, tokens [B,L,d], known [B,L] bool)

log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    """How images are drawn: the ``sampling`` section of the configuration tree, stored in every
    checkpoint as its sampling defaults. The defaults are the published launch scripts'
    (guidance 1.0, temperature 0.94, 64 iterations, 100 Euler steps of the flow ODE)."""

    num_iter: int = setting(64, "K unmasking iterations")
    guidance_scale: float = setting(1.0, "classifier-free guidance scale g (1.0: conditional branch only)")
    guidance_schedule: str = setting(
        "linear", "constant g, or 1 + (g - 1) x share of tokens already known", choices=GUIDANCE_SCHEDULES
    )
    temperature: float = setting(0.94, "scale of the flow ODE's initial noise")
    ode_steps: int = setting(100, "flow ODE steps per token")
    ode_solver: str = setting("euler", "integrator of the flow ODE", choices=ODE_SOLVERS)

    def validate(self) -> None:
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(
                f"unknown guidance schedule {self.guidance_schedule!r}; choose one of {GUIDANCE_SCHEDULES}"
            )
        if self.ode_solver not in ODE_SOLVERS:
            raise ValueError(f"unknown ODE solver {self.ode_solver!r}; choose one of {ODE_SOLVERS}")
        if self.num_iter < 1:
            raise ValueError(f"num_iter must be at least 1, got {self.num_iter}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.ode_steps < 1:
            raise ValueError(f"ode_steps must be at least 1, got {self.ode_steps}")


def num_hidden_after(step: int, num_iter: int, seq_len: int, hidden_now: int) -> int:
    """Tokens still hidden after step ``step`` (0-based) of ``num_iter``: the cosine schedule,
    at least one fewer than now, and 0 after the last step."""
    if step == num_iter - 1:
        return 0
    target = int(math.floor(seq_len * math.cos(math.pi / 2 * (step + 1) / num_iter)))
    return max(1, min(hidden_now - 1, target))


@torch.no_grad()
def sample_tokens(
    model: JEPAT,
    text: TextEmbeddings,
    null: torch.Tensor,
    sampling: SamplingConfig,
    generator: torch.Generator | None = None,
    batch_null: bool | None = None,
    orders: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    on_step: StepHook | None = None,
) -> torch.Tensor:
    """Generate image tokens for a batch of captions.

    Args:
        text: caption embeddings [B, ...] (computed once for the batch by the caller).
        null: [B] bool, True where the prompt is empty and the image is unconditional.
        generator: torch.Generator on the model's device; the same seed gives the same images.
        batch_null: run the null-condition rows (CFG). Default: whenever the guidance scale != 1.
        orders, noise: the randomness drawn by the caller instead of from ``generator``: unmasking
            orders [B, L] and the flow's unit starting noise per token position [B, L, d]. With
            both, image b depends only on its own row (evaluation seeds every image by its id).
        on_step: called after each unmasking step with (step, the canvas: tokens [B, L, d] with
            zeros where still hidden, known [B, L] bool); it only watches, the samples do not change.
    Returns: tokens [B, L, d] (float32).
    """
    mc = model.cfg
    B, L, d = text.pooled.shape[0], mc.seq_len, mc.token_dim
    sampling.validate()
    device = text.pooled.device
    num_iter = sampling.num_iter
    if num_iter > L:
        log.warning("num_iter %d is more than the %d tokens; using %d (one token per step)", num_iter, L, L)
        num_iter = L
    use_null = (sampling.guidance_scale != 1.0) if batch_null is None else batch_null
    if orders is None:
        orders = random_orders(B, L, device, generator)  # [B,L]
    tokens = torch.zeros(B, L, d, device=device)  # [B,L,d]
    if use_null:
        text = TextEmbeddings.cat([text, text])
        drop = torch.cat([null, torch.ones_like(null)])  # [2B]
    else:
        drop = null
    cond = model.condition(text, drop)  # once per batch
    rows = 2 if use_null else 1
    # late fusion: the backbone never sees the caption, so both CFG rows share one pass
    passes = 1 if model.text_free_backbone else rows
    cond_in = cond.first(B) if passes == 1 else cond
    orders_in = torch.cat([orders] * passes)  # [pB,L], fixed
    hidden = L
    for step in range(num_iter):
        h = model.backbone(torch.cat([tokens] * passes), cond_in, orders_in, hidden)  # [pB,L,D]
        hidden_next = num_hidden_after(step, num_iter, L, hidden)
        reveal = orders[:, hidden_next:hidden]  # [B,n]
        n = reveal.shape[1]
        at = torch.cat([reveal] * passes)  # [pB,n]
        h = h.gather(1, at[..., None].expand(-1, -1, h.shape[-1]))  # [pB,n,D]
        # text fusion runs on the revealed positions only; each position is fused on its own
        z = model.fuse_text(torch.cat([h] * (rows // passes)), cond, torch.cat([reveal] * rows))
        z_sel = z.flatten(0, 1)  # [rB*n,D]
        guidance = None
        if use_null:
            known = (L - hidden_next) / L if sampling.guidance_schedule == "linear" else 1.0
            g = 1.0 + (sampling.guidance_scale - 1.0) * known
            guidance = torch.full((B * n,), g, device=device)
        eps = None if noise is None else noise.gather(1, reveal[..., None].expand(-1, -1, d)).flatten(0, 1)
        new = sample_tokens_from_head(
            model.flow_head,
            z_sel,
            sampling.temperature,
            sampling.ode_steps,
            sampling.ode_solver,
            guidance,
            generator,
            eps,
        )  # [B*n,d]
        tokens = tokens.scatter(1, reveal[..., None].expand(-1, -1, d), new.view(B, n, d).float())
        hidden = hidden_next
        if on_step is not None:
            known = torch.zeros(B, L, dtype=torch.bool, device=device).scatter(1, orders[:, hidden:], True)
            on_step(step, tokens, known)
    return tokens
