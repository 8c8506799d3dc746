"""The training loop of JEPA-T: device-agnostic, with no host sync on the hot path except at
logging intervals. ``main_jepat.py`` builds what it needs; generation lives in
``util/evaluation/generate.py``."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Protocol, Sequence, Tuple

import torch
from tqdm import tqdm

from models.text_encoders import TextEmbeddings
from models.tokenizers import Tokenizer, patchify
from util.data.captions import CaptionStore
from util.runtime import autocast_context, interactive
from util.training.checkpoint import TrainState
from util.training.parallel import Parallel, grad_norm_value, seed_step
from util.training.schedules import Schedules

log = logging.getLogger(__name__)


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
    torch._foreach_lerp_(list(ema.parameters()), [p.detach() for p in model.parameters()], 1.0 - momentum)


@dataclass
class StepSettings:
    """The per-step settings of ``train_one_epoch``."""
    precision: str = "fp32"          # fp32 | bf16 | fp16 (autocast; fp16 uses the Parallel's GradScaler)
    grad_clip: float = 3.0           # max gradient norm (<= 0: none, still measured)
    accum_iter: int = 1              # micro-batches per optimizer step
    log_freq: int = 50               # optimizer steps between loss read-backs (the only host syncs)
    max_steps: Optional[int] = None  # stop once this many optimizer steps are done
    seed: int = 0                    # micro-batch m of step s draws from seed_step(seed, s, rank * accum + m)


class ModelInputs:
    """A loader batch (images or cached latents [B,...], captions) -> the model's inputs:
    tokens [B,L,d] (frozen tokenizer, then patchify) and caption embeddings (caption store)."""

    def __init__(self, tokenizer: Tokenizer, captions: CaptionStore, patch_size: int, device: torch.device) -> None:
        self.tokenizer, self.captions, self.patch_size, self.device = tokenizer, captions, patch_size, device

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, captions: Sequence[str]) -> Tuple[torch.Tensor, TextEmbeddings]:
        images = images.to(self.device, non_blocking=True)
        x = patchify(self.tokenizer.encode(images), self.patch_size).float()            # [B,L,d]
        return x, self.captions.lookup(captions)


class Monitor(Protocol):
    """What the loop reports to (``main_jepat.RunMonitor``): logged values and the end of each step."""

    def log(self, step: int, values: Dict[str, float]) -> None: ...

    def after_step(self, state: TrainState) -> bool:
        """Called after every optimizer step; True stops the epoch (checkpoints, signals, --max_steps)."""


def train_one_epoch(parallel: Parallel, loader: Iterable, optimizer: torch.optim.Optimizer, inputs: ModelInputs,
                    schedules: Schedules, state: TrainState, settings: StepSettings, monitor: Monitor
                    ) -> Dict[str, float]:
    """One pass over ``loader`` (which starts at ``state.batch_in_epoch``).

    ``accum_iter`` micro-batches make one optimizer step (their losses divided by ``accum_iter``,
    no gradient sync on all but the last). Losses are summed on the device and read back every
    ``log_freq`` steps, summed over ranks, so every rank logs the same values; a non-finite loss
    raises FloatingPointError there, before any checkpoint can be written.
    """
    parallel.model.train()
    device, accum, scaler = parallel.env.device, max(1, settings.accum_iter), parallel.scaler
    sums = torch.zeros(5, device=device)       # loss, flow, jepa, count, non-finite count since the last flush
    last: Dict[str, float] = {}
    bar = tqdm(total=len(loader), desc=f"epoch {state.epoch}", leave=False, dynamic_ncols=True,
               disable=not (interactive() and log.isEnabledFor(logging.INFO)))
    epoch_end = (state.batch_in_epoch + len(loader)) // accum * accum   # micro-batches that make whole steps
    micro = 0
    for images, captions in loader:
        if (settings.max_steps is not None and state.step >= settings.max_steps) or state.batch_in_epoch >= epoch_end:
            break
        if micro == 0:
            applied = {"lr": schedules.lr.apply(optimizer, state.step),
                       "weight_decay": schedules.weight_decay.apply(optimizer, state.step),
                       "ema_momentum": schedules.ema(state.step)}
            optimizer.zero_grad(set_to_none=True)
        seed_step(settings.seed, state.step, parallel.env.rank * accum + micro, state.host_generator)
        x, text = inputs(images, captions)
        sync = micro == accum - 1
        with parallel.grad_sync(sync):
            with autocast_context(device, settings.precision):
                out = parallel.train_module(x, text, state.host_generator)
            loss = out["loss"] / accum if accum > 1 else out["loss"]
            (scaler.scale(loss) if scaler is not None else loss).backward()
        state.batch_in_epoch += 1
        detached = out["loss"].detach().float()
        sums += torch.stack([detached, out["flow"].float(), out["jepa"].float(), torch.ones((), device=device),
                             (~torch.isfinite(detached)).float()])
        if not sync:
            micro += 1
            continue
        micro = 0
        grad_norm = _optimizer_step(parallel, optimizer, settings.grad_clip)
        update_ema(parallel.ema, parallel.model, applied["ema_momentum"])
        state.step += 1
        bar.update(accum)
        if state.step % settings.log_freq == 0:
            last = _flush(parallel, sums, state, {**applied, "grad_norm": grad_norm, "mask_ratio": out["mask_ratio"]},
                          monitor, bar)
        if monitor.after_step(state):
            break
    if sums[3] > 0:   # the same count on every rank
        last = _flush(parallel, sums, state, {**applied, "grad_norm": grad_norm, "mask_ratio": out["mask_ratio"]},
                      monitor, bar)
    bar.close()
    return last


def _optimizer_step(parallel: Parallel, optimizer: torch.optim.Optimizer, grad_clip: float) -> torch.Tensor:
    """Unscale (fp16), clip, step; returns the gradient norm before clipping (on the device)."""
    scaler = parallel.scaler
    if scaler is not None:
        scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(parallel.model.parameters(), grad_clip if grad_clip > 0 else math.inf)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return grad_norm


def _flush(parallel: Parallel, sums: torch.Tensor, state: TrainState, applied: Dict, monitor: Monitor,
           bar: tqdm) -> Dict[str, float]:
    """Read the accumulated losses back (the only host sync), summed over ranks; check
    finiteness; report. ``applied``: the schedule values of the last step, its grad norm and mask ratio."""
    parallel.reduce_sum_(sums)
    count, bad = int(sums[3].item()), int(sums[4].item())
    loss, flow, jepa = (sums[:3] / max(count, 1)).tolist()
    if bad or not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss within the {count} steps ending at step {state.step}; the last checkpoint "
            "was written before it and is kept. Lower --lr or use --precision fp32 to investigate")
    sums.zero_()
    values = {"loss": loss, "flow_loss": flow, "jepa_loss": jepa, "lr": applied["lr"],
              "weight_decay": applied["weight_decay"], "ema_momentum": applied["ema_momentum"],
              "grad_norm": grad_norm_value(applied["grad_norm"]), "mask_ratio": float(applied["mask_ratio"])}
    if bar.disable:
        log.info("epoch %d step %d: loss %.4f (flow %.4f, jepa %.4f) lr %.2e grad norm %.3g", state.epoch,
                 state.step, loss, flow, jepa, values["lr"], values["grad_norm"])
    else:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}")
    monitor.log(state.step, values)
    return values
