"""Training and generation loops for JEPA-T; device-agnostic, no host sync on the hot path
except at logging intervals."""
from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from tqdm import tqdm

from models.jepat import JEPAT, training_losses
from models.sampler import SamplingConfig, sample_tokens
from models.tokenizers import Tokenizer, patchify, unpatchify
from util.schedules import CosineValue, LRSchedule, WeightDecaySchedule
from util.text_cache import TextEmbeddingTable

log = logging.getLogger(__name__)


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the given device type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def param_groups(model: torch.nn.Module) -> List[Dict]:
    """AdamW groups: matrices decay; biases, norms, embeddings, mask/null tokens do not."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("_pos") or name in ("mask_token", "null_pooled", "null_token"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "decay": True}, {"params": no_decay, "weight_decay": 0.0, "decay": False}]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, momentum: float) -> None:
    """theta_bar <- m * theta_bar + (1 - m) * theta, in one fused call."""
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - momentum)


@dataclass
class TrainState:
    """Counters that make a resume exact; saved in the checkpoint."""
    step: int = 0                   # optimizer steps done
    epoch: int = 0                  # current epoch
    batch_in_epoch: int = 0         # batches of the current epoch already consumed
    host_generator: torch.Generator = field(default_factory=torch.Generator)


@dataclass
class Schedules:
    lr: LRSchedule
    weight_decay: WeightDecaySchedule
    ema: CosineValue


def train_one_epoch(model: JEPAT, ema: JEPAT, loader: Iterable, optimizer: torch.optim.Optimizer,
                    tokenizer: Tokenizer, text_table: TextEmbeddingTable, patch_size: int,
                    schedules: Schedules, state: TrainState, device: torch.device, precision: str,
                    scaler: Optional[torch.amp.GradScaler], grad_clip: float, flow_weight: float,
                    jepa_weight: float, log_every: int, log_fn: Callable[[int, Dict[str, float]], None],
                    max_steps: Optional[int] = None,
                    step_hook: Optional[Callable[[TrainState], bool]] = None) -> Dict[str, float]:
    """One pass over ``loader`` (which starts at ``state.batch_in_epoch``).

    Losses are accumulated on the device and read back every ``log_every`` steps. A non-finite
    loss raises FloatingPointError naming the step (checked at those same points, before any
    checkpoint can be written). ``step_hook(state)`` runs after every step; returning True stops
    the epoch early (periodic checkpoints, time budgets, preemption).
    """
    model.train()
    sums = torch.zeros(4, device=device)          # loss, flow, jepa, count since the last flush
    bad = torch.zeros((), dtype=torch.bool, device=device)   # any non-finite loss since then
    last: Dict[str, float] = {}
    bar = tqdm(total=len(loader), desc=f"epoch {state.epoch}", leave=False, dynamic_ncols=True,
               disable=not log.isEnabledFor(logging.INFO))
    for images, captions in loader:
        if max_steps is not None and state.step >= max_steps:
            break
        lr = schedules.lr.apply(optimizer, state.step)
        wd = schedules.weight_decay.apply(optimizer, state.step)
        momentum = schedules.ema(state.step)
        images = images.to(device, non_blocking=True)
        text = text_table.lookup(captions)
        with torch.no_grad():
            x = patchify(tokenizer.encode(images), patch_size).float()                 # [B,L,d]
        with autocast_context(device, precision):
            out = training_losses(model, ema, x, text, state.host_generator, flow_weight, jepa_weight)
        loss = out["loss"]
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        update_ema(ema, model, momentum)
        state.step += 1
        state.batch_in_epoch += 1
        sums += torch.stack([loss.detach().float(), out["flow"].float(), out["jepa"].float(),
                             torch.ones((), device=device)])
        bad |= ~torch.isfinite(loss.detach())
        bar.update(1)
        if state.step % log_every == 0:
            last = _flush(sums, bad, state, lr, wd, momentum, grad_norm, out["mask_ratio"], log_fn, bar)
        if step_hook is not None and step_hook(state):
            break
    if sums[3] > 0:
        last = _flush(sums, bad, state, lr, wd, momentum, grad_norm, out["mask_ratio"], log_fn, bar)
    bar.close()
    return last


def _flush(sums: torch.Tensor, bad: torch.Tensor, state: TrainState, lr: float, wd: float, momentum: float,
           grad_norm: torch.Tensor, mask_ratio: torch.Tensor,
           log_fn: Callable[[int, Dict[str, float]], None], bar: tqdm) -> Dict[str, float]:
    """Read the accumulated losses back (the only host sync), check finiteness, log."""
    count = int(sums[3].item())
    loss, flow, jepa, _ = (sums / max(count, 1)).tolist()
    if bool(bad) or not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss within the {count} steps ending at step {state.step}; the last checkpoint "
            "was written before it and is kept. Lower --lr or use --precision fp32 to investigate")
    sums.zero_()
    values = {"loss": loss, "flow_loss": flow, "jepa_loss": jepa, "lr": lr, "weight_decay": wd,
              "ema_momentum": momentum, "grad_norm": float(grad_norm), "mask_ratio": float(mask_ratio)}
    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
    log_fn(state.step, values)
    return values


# -------------------------------------------------------------------- generation
@torch.no_grad()
def generate_images(model: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer, prompts: Sequence[str],
                    sampling: SamplingConfig, patch_size: int, seed: int, device: torch.device,
                    precision: str = "bf16", batch_size: int = 64) -> torch.Tensor:
    """Images [N,3,H,W] in [-1,1] for the prompts; image i depends only on (seed, i, prompt)
    batch composition aside. Empty prompts give unconditional images (logged)."""
    model.eval()
    empty = [i for i, p in enumerate(prompts) if not p.strip()]
    if empty:
        log.warning("%d empty prompt(s) (positions %s): sampling them with the null condition (unconditional)",
                    len(empty), empty[:10])
    grid = int(round(math.sqrt(model.cfg.seq_len)))
    channels = model.cfg.token_dim // (patch_size * patch_size)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        gen = torch.Generator(device=device).manual_seed(seed * 1000003 + start)
        text = text_table.lookup(chunk)
        null = torch.tensor([not p.strip() for p in chunk], device=device)
        with autocast_context(device, precision):
            tokens = sample_tokens(model, text, null, sampling, generator=gen)          # [b,L,d]
        latents = unpatchify(tokens.float(), channels, patch_size, grid)               # [b,c,h,w]
        out.append(tokenizer.decode(latents).float().cpu())
    return torch.cat(out)
