"""The JEPA-T training objective, kept apart from the network (as SiT keeps ``training_losses``
beside its model): the distributed wrappers in ``util/training/parallel.py`` call it.

One batch:
    r ~ truncated N(1, std) on [mask_ratio_min, 1]; the first ceil(r L) tokens of a random order are hidden
    cond = model.condition(text, drop)               drop ~ Bernoulli(cond_drop_prob): the learned null
    z    = model(x, cond, orders, num_masked)        [B,L,D]
    flow = E ||v_psi(x_t, t, z_i) - (x_i - eps)||^2 over hidden tokens (each drawn diffusion_batch_mul times)
    jepa = SmoothL1_beta(jepa_head(z_i), target_i)    target = EMA encoder over the FULL sequence (stop-grad)
    loss = flow_weight * flow + jepa_weight * jepa
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.flow_head import flow_matching_loss
from models.jepat import JEPAT, random_orders, sample_mask_ratio
from models.settings import setting
from models.text_encoders import TextEmbeddings

PUBLISHED_JEPA_BETA = 2.0  # the SmoothL1 beta of the published JEPA-T code


class EMATarget(nn.Module):
    """``forward(x, text, drop)`` = the EMA encoder's states of the full sequence [B,L,D] (the JEPA
    targets), in one forward so that a sharded EMA gathers its parameters through FSDP's hooks."""

    def __init__(self, ema: JEPAT) -> None:
        super().__init__()
        self.ema = ema

    @torch.no_grad()
    def forward(self, x: torch.Tensor, text: TextEmbeddings, drop: torch.Tensor) -> torch.Tensor:
        return self.ema.encode_full(x, self.ema.condition(text, drop))


def noisy_caption(text: TextEmbeddings, scale: float) -> TextEmbeddings:
    """``text`` with Gaussian noise of std ``scale`` x each caption's RMS on its real token states
    and on its pooled vector (padding stays as it was): a caption then conditions a neighbourhood of
    the text encoder's space rather than one point, so unseen words that land near trained ones are
    read like them. Drawn from the device's default generator, like the masks."""
    tokens, mask, pooled = text.tokens, text.mask, text.pooled
    m = mask[..., None].to(tokens.dtype)  # [B,S,1]
    count = (m.sum(1, keepdim=True) * tokens.shape[-1]).clamp_min(1)  # [B,1,1]
    tok_rms = ((tokens.float() ** 2 * m).sum((1, 2), keepdim=True) / count).sqrt()  # [B,1,1]
    pool_rms = pooled.float().pow(2).mean(-1, keepdim=True).sqrt()  # [B,1]
    tokens = tokens + (scale * tok_rms * torch.randn_like(tokens, dtype=torch.float32) * m).to(tokens.dtype)
    pooled = pooled + (scale * pool_rms * torch.randn_like(pooled, dtype=torch.float32)).to(pooled.dtype)
    return TextEmbeddings(tokens=tokens, mask=mask, pooled=pooled)


@dataclass
class JEPATLoss:
    """``loss(model, target, x, text, host_generator)`` -> dict of scalar tensors
    (loss, flow, jepa, mask_ratio). Its fields are the ``loss`` section of the configuration tree.

    Args of the call:
        model: the JEPAT being trained (or its DDP/FSDP-wrapped modules' JEPAT).
        target: an ``EMATarget`` (or any callable with its signature); unused when jepa_weight is 0.
        x: clean image tokens [B,L,d]; text: the batch's caption embeddings.
        host_generator: CPU generator of the per-batch mask ratio (no device sync).
    """

    flow_weight: float = setting(1.0, "weight of the flow-matching loss")
    jepa_weight: float = setting(1.0, "weight of the JEPA (SmoothL1) loss")
    jepa_beta: float = setting(PUBLISHED_JEPA_BETA, "SmoothL1 beta of the JEPA loss")
    caption_noise: float = setting(
        0.0,
        "training only: Gaussian noise added to each caption's token states and pooled vector, "
        "its std this multiple of the caption's own RMS (0: off; the published code has none)",
    )

    def __post_init__(self) -> None:
        if self.flow_weight < 0 or self.jepa_weight < 0 or self.flow_weight + self.jepa_weight == 0:
            raise ValueError(
                f"loss weights must be >= 0 and not both 0, got flow {self.flow_weight}, jepa {self.jepa_weight}"
            )
        if self.jepa_beta <= 0:
            raise ValueError(f"loss.jepa_beta must be positive, got {self.jepa_beta}")
        if not 0 <= self.caption_noise <= 10:
            raise ValueError(f"loss.caption_noise must be in [0, 10] (a multiple of the RMS), got {self.caption_noise}")

    def __call__(
        self, model: JEPAT, target: nn.Module, x: torch.Tensor, text: TextEmbeddings, host_generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        cfg = model.cfg
        B, L, _ = x.shape
        ratio = sample_mask_ratio(host_generator, cfg.mask_ratio_min, cfg.mask_ratio_std)
        num_masked = min(L, max(1, int(math.ceil(L * ratio))))
        orders = random_orders(B, L, x.device)  # [B,L]
        drop = torch.rand(B, device=x.device) < cfg.cond_drop_prob  # [B]
        if self.caption_noise > 0:
            text = noisy_caption(text, self.caption_noise)
        z = model(x, model.condition(text, drop), orders, num_masked)  # [B,L,D]
        hidden = orders[:, :num_masked]  # [B,M]
        z_m = z.gather(1, hidden[..., None].expand(-1, -1, z.shape[-1]))  # [B,M,D]
        x_m = x.gather(1, hidden[..., None].expand(-1, -1, x.shape[-1]))  # [B,M,d]
        flow = flow_matching_loss(
            model.flow_head,
            x_m.flatten(0, 1),
            z_m.flatten(0, 1),
            cfg.diffusion_batch_mul,
            cfg.t_logit_mean,
            cfg.t_logit_std,
        )
        if self.jepa_weight > 0:
            y = target(x, text, drop)  # [B,L,D], no grad
            y_m = y.gather(1, hidden[..., None].expand(-1, -1, y.shape[-1]))  # [B,M,D]
            jepa = F.smooth_l1_loss(model.jepa_head(z_m).float(), y_m.float(), beta=self.jepa_beta)
        else:
            jepa = torch.zeros((), device=x.device)
        loss = self.flow_weight * flow + self.jepa_weight * jepa
        return {"loss": loss, "flow": flow.detach(), "jepa": jepa.detach(), "mask_ratio": torch.tensor(num_masked / L)}
