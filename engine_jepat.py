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
from util.dist import grad_norm_value, seed_step
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
                    step_hook: Optional[Callable[[TrainState], bool]] = None,
                    accum_iter: int = 1, train_module: Optional[Callable[..., Dict[str, torch.Tensor]]] = None,
                    grad_sync: Optional[Callable[[bool], contextlib.AbstractContextManager]] = None,
                    reduce_sum_: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                    seed: Optional[int] = None, shard: int = 0) -> Dict[str, float]:
    """One pass over ``loader`` (which starts at ``state.batch_in_epoch``).

    Losses are accumulated on the device and read back every ``log_every`` steps. A non-finite
    loss raises FloatingPointError naming the step (checked at those same points, before any
    checkpoint can be written). ``step_hook(state)`` runs after every step; returning True stops
    the epoch early (periodic checkpoints, time budgets, preemption).

    Distributed / accumulation (``util/dist.py``): ``accum_iter`` micro-batches make one optimizer
    step (their losses divided by ``accum_iter``; ``grad_sync(False)`` on all but the last);
    ``train_module`` computes the losses in one forward (DDP, FSDP, compile); ``reduce_sum_``
    sums the logged values over ranks at log intervals only; with ``seed`` set, micro-batch m of
    step s draws its randomness from ``seed_step(seed, s, shard * accum_iter + m)``.
    """
    model.train()
    sums = torch.zeros(4, device=device)          # loss, flow, jepa, count since the last flush
    bad = torch.zeros((), dtype=torch.bool, device=device)   # any non-finite loss since then
    last: Dict[str, float] = {}
    bar = tqdm(total=len(loader), desc=f"epoch {state.epoch}", leave=False, dynamic_ncols=True,
               disable=not log.isEnabledFor(logging.INFO))
    accum = max(1, accum_iter)
    epoch_end = (state.batch_in_epoch + len(loader)) // accum * accum   # micro-batches that make whole steps
    micro = 0
    for images, captions in loader:
        if (max_steps is not None and state.step >= max_steps) or state.batch_in_epoch >= epoch_end:
            break
        if micro == 0:
            lr = schedules.lr.apply(optimizer, state.step)
            wd = schedules.weight_decay.apply(optimizer, state.step)
            momentum = schedules.ema(state.step)
            optimizer.zero_grad(set_to_none=True)
        if seed is not None:
            seed_step(seed, state.step, shard * accum + micro, state.host_generator)
        images = images.to(device, non_blocking=True)
        text = text_table.lookup(captions)
        with torch.no_grad():
            x = patchify(tokenizer.encode(images), patch_size).float()                 # [B,L,d]
        sync = micro == accum - 1
        with grad_sync(sync) if grad_sync is not None else contextlib.nullcontext():
            with autocast_context(device, precision):
                if train_module is not None:
                    out = train_module(x, text, state.host_generator, flow_weight, jepa_weight)
                else:
                    out = training_losses(model, ema, x, text, state.host_generator, flow_weight, jepa_weight)
            loss = out["loss"]
            micro_loss = loss / accum if accum > 1 else loss
            if scaler is not None:
                scaler.scale(micro_loss).backward()
            else:
                micro_loss.backward()
        state.batch_in_epoch += 1
        sums += torch.stack([loss.detach().float(), out["flow"].float(), out["jepa"].float(),
                             torch.ones((), device=device)])
        bad |= ~torch.isfinite(loss.detach())
        if not sync:
            micro += 1
            continue
        micro = 0
        if scaler is not None:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        update_ema(ema, model, momentum)
        state.step += 1
        bar.update(accum)
        if state.step % log_every == 0:
            last = _flush(sums, bad, state, lr, wd, momentum, grad_norm, out["mask_ratio"], log_fn, bar, reduce_sum_)
        if step_hook is not None and step_hook(state):
            break
    if sums[3] > 0:   # the same count on every rank
        last = _flush(sums, bad, state, lr, wd, momentum, grad_norm, out["mask_ratio"], log_fn, bar, reduce_sum_)
    bar.close()
    return last


def _flush(sums: torch.Tensor, bad: torch.Tensor, state: TrainState, lr: float, wd: float, momentum: float,
           grad_norm: torch.Tensor, mask_ratio: torch.Tensor,
           log_fn: Callable[[int, Dict[str, float]], None], bar: tqdm,
           reduce_sum_: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> Dict[str, float]:
    """Read the accumulated losses back (the only host sync), check finiteness, log.
    With ``reduce_sum_`` the sums and the non-finite flag are first summed over ranks, so every
    rank logs the same values and stops together."""
    if reduce_sum_ is not None:
        packed = reduce_sum_(torch.cat([sums, bad.float()[None]]))
        sums.copy_(packed[:4])
        bad.copy_(packed[4] > 0)
    count = int(sums[3].item())
    loss, flow, jepa, _ = (sums / max(count, 1)).tolist()
    if bool(bad) or not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss within the {count} steps ending at step {state.step}; the last checkpoint "
            "was written before it and is kept. Lower --lr or use --precision fp32 to investigate")
    sums.zero_()
    values = {"loss": loss, "flow_loss": flow, "jepa_loss": jepa, "lr": lr, "weight_decay": wd,
              "ema_momentum": momentum, "grad_norm": grad_norm_value(grad_norm), "mask_ratio": float(mask_ratio)}
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
