"""The training loop of JEPA-T, read top to bottom in ``train``: fetch, inputs, forward/backward
with accumulation, optimizer step, EMA, log, save, evaluate, stop. Device-agnostic, with no host
sync on the hot path except at logging intervals. ``main_jepat.py`` builds the ``Run``."""

from __future__ import annotations

import json
import logging
import math
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.jepat import JEPAT
from models.text_encoders import TextEmbeddings
from models.tokenizers import Tokenizer, patchify
from util.config import TrainConfig, to_dict
from util.data.caption_table import CaptionRows
from util.data.captions import CaptionStore
from util.data.datasets import DataOrder
from util.evaluation.evaluate import EvalOptions, evaluate, training_grid
from util.evaluation.generate import ImageGenerator
from util.runtime import DistEnv, autocast_context, interactive
from util.training.checkpoint import TrainingCheckpoint, TrainState
from util.training.curves import write_curves
from util.training.loggers import RunLogger, parse_log_with
from util.training.parallel import Parallel, compile_report, grad_norm_value, seed_step
from util.training.schedules import Schedules
from util.training.throughput import count_flops, peak_flops

log = logging.getLogger(__name__)


def param_groups(model: torch.nn.Module) -> list[dict]:
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


class ModelInputs:
    """A loader batch (images or cached latents [B,...], captions) -> the model's inputs:
    tokens [B,L,d] (frozen tokenizer, then patchify) and caption embeddings (caption store)."""

    def __init__(self, tokenizer: Tokenizer, captions: CaptionStore, patch_size: int, device: torch.device) -> None:
        self.tokenizer, self.captions, self.patch_size, self.device = tokenizer, captions, patch_size, device

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, captions: Sequence[str] | CaptionRows
    ) -> tuple[torch.Tensor, TextEmbeddings]:
        images = images.to(self.device, non_blocking=True)
        x = patchify(self.tokenizer.encode(images), self.patch_size).float()  # [B,L,d]
        if isinstance(captions, CaptionRows):  # gathered by the loader: moved without a host sync
            t, m, u = (v.to(self.device, non_blocking=True) for v in captions)
            return x, TextEmbeddings(t.float(), m, u.float())
        return x, self.captions.lookup(captions)


@dataclass
class Run:
    """Everything one training run holds, built once by ``main_jepat.build_run``."""

    config: TrainConfig
    env: DistEnv
    out_dir: Path
    tokenizer: Tokenizer  # decodes grids and evaluation samples
    captions: CaptionStore
    model: JEPAT
    ema: JEPAT
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    loader: DataLoader
    order: DataOrder  # which items each rank reads, resumable mid-epoch
    inputs: ModelInputs
    state: TrainState
    checkpoint: TrainingCheckpoint
    eval: EvalOptions
    builtin_eval: str | None  # trained on a built-in set (shapes, pairs): its judged evaluation applies
    steps_per_epoch: int
    history: list[dict] = field(default_factory=list)  # the rows of train_log.json


class StopSignals:
    """SIGTERM / SIGUSR1 (preemption) on any rank stop every rank at the same step. The handlers
    live only as long as the ``with`` block."""

    def __init__(self, env: DistEnv) -> None:
        self.env, self.signal, self._saved = env, 0, {}
        self._received = 0  # written only by the handler, so an all-reduce in flight cannot overwrite it
        self._pending: Callable[[], int] | None = None  # the agreement started at the previous call

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        if self._pending is not None and exc[0] is None:  # every rank completes the last agreement
            self.signal = max(self.signal, self._pending())  # a signal of the last step is not lost

    def _on_signal(self, signum, frame) -> None:
        self._received = signum

    def requested(self) -> bool:
        """Whether any rank got a signal; all ranks agree, at the same call. Across ranks the answer
        is the host-side all-reduce started at the previous call (one step earlier), so its round
        trip overlaps a step instead of stalling every step; a signal is acted on one or two steps
        after it lands, never lost (one that lands while a reduce is in flight goes into the next)."""
        if not self.env.initialized:
            self.signal = max(self.signal, self._received)
            return self.signal != 0
        if self._pending is not None:
            self.signal = max(self.signal, self._pending())
        self._pending = self.env.max_over_ranks_async(self._received)
        return self.signal != 0


# ==================================================================== the loop
def train(run: Run) -> dict:
    """Optimizer steps until ``optim.epochs`` (or ``runtime.max_steps``, or a stop signal), then the
    evaluation, and (rank 0) train_log.json and curves.png.

    ``accum_iter`` micro-batches make one optimizer step (losses divided by ``accum_iter``, no
    gradient sync on all but the last). Losses are summed on the device and read back every
    ``log_freq`` steps; a non-finite loss raises FloatingPointError there, before any checkpoint.
    """
    c, st, env, parallel, optimizer = run.config, run.state, run.env, run.parallel, run.optimizer
    accum, max_steps = c.optim.accum_iter, math.inf if c.runtime.max_steps is None else c.runtime.max_steps
    logger = _open_logger(run)  # rank 0 only
    meter, stop = StepMeter(env.device, c.optim.batch_size * env.world_size), False
    try:
        with StopSignals(env) as signals:
            st.started = time.time()
            while st.epoch < c.optim.epochs and st.step < max_steps and not stop:
                parallel.model.train()
                run.order.set_position(st.epoch, st.batch_in_epoch)
                epoch_end, micro, bar = run.steps_per_epoch * accum, 0, _progress(run)
                for images, captions in run.loader:  # 1. fetch
                    if st.batch_in_epoch >= epoch_end:
                        break
                    if micro == 0:
                        applied = run.schedules.apply(optimizer, st.step)  # lr, weight decay, EMA momentum
                        optimizer.zero_grad(set_to_none=True)
                    seed_step(c.runtime.seed, st.step, env.rank * accum + micro, st.host_generator)
                    x, text = run.inputs(images, captions)  # 2. inputs
                    if meter.flops is None:  # once per run, before the first update: FLOPs of a micro-batch
                        meter.count_flops(run, x, text)
                    with parallel.grad_sync(micro == accum - 1):  # 3. forward/backward
                        with autocast_context(env.device, c.runtime.precision):
                            out = parallel.train_module(x, text, st.host_generator)
                        parallel.backward(out["loss"] / accum)
                    st.batch_in_epoch, micro = st.batch_in_epoch + 1, (micro + 1) % accum
                    meter.add(out)
                    if micro:
                        continue
                    applied["grad_norm"] = _optimizer_step(parallel, optimizer, c.optim.grad_clip)  # 4. step
                    update_ema(parallel.ema, parallel.model, applied["ema_momentum"])  # 5. EMA
                    st.step += 1
                    bar.update(accum)
                    if st.step % c.runtime.log_freq == 0:  # 6. log
                        _log(run, logger, meter, {**applied, "mask_ratio": out["mask_ratio"]}, bar)
                    stop = signals.requested() or st.step >= max_steps
                    ends = stop or st.batch_in_epoch >= epoch_end  # then _end_epoch saves
                    if c.runtime.save_every_steps and st.step % c.runtime.save_every_steps == 0 and not ends:
                        run.checkpoint.save("last")  # 7. save
                    if stop:  # 9. stop
                        break
                if meter.count:  # the same count on every rank
                    _log(run, logger, meter, {**applied, "mask_ratio": out["mask_ratio"]}, bar)
                bar.close()
                _end_epoch(run, logger, epoch_end)  # 7. save, 8. evaluate
                stop = stop or signals.requested()  # 9. stop
        return _finish(run, logger, signals.signal)
    finally:
        if logger is not None:
            logger.close()


class StepMeter:
    """The losses of the micro-batches since the last log line, summed on the device (no host
    sync), with how many there were, how long they took and the FLOPs they ran."""

    def __init__(self, device: torch.device, images_per_micro_batch: int) -> None:
        self.sums = torch.zeros(5, device=device)  # loss, flow, jepa, micro-batches, non-finite losses
        self.count, self.images_per_micro_batch, self.since = 0, images_per_micro_batch, time.perf_counter()
        self.flops: int | None = None  # of one micro-batch on one rank, forward and backward
        self.peak, self.peak_source = math.nan, ""  # FLOP/s of one device

    def count_flops(self, run: Run, x: torch.Tensor, text: TextEmbeddings) -> None:
        """Count one micro-batch's FLOPs in an eager forward and backward (compiled parts run
        eagerly; every rank, so that DDP and FSDP collectives match) and leave no trace: the random
        states (global, this device's, the host generator) are put back as they were and the
        gradients zeroed, so the run trains exactly as it would have."""
        c, st, p, device = run.config, run.state, run.parallel, run.env.device

        def step() -> None:
            with autocast_context(device, c.runtime.precision):
                out = p.train_module(x, text, st.host_generator)
            p.backward(out["loss"])

        host = st.host_generator.get_state()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self.flops = count_flops(step)
        st.host_generator.set_state(host)
        run.optimizer.zero_grad(set_to_none=True)
        self.peak, self.peak_source = peak_flops(device, c.runtime.precision)
        self.since = time.perf_counter()  # the first interval's rate leaves this pass out
        log.info("%.3g GFLOP per micro-batch of %d per rank (forward and backward, recomputation included); "
                 "device peak %.3g TFLOP/s (%s)", self.flops / 1e9, c.optim.batch_size, self.peak / 1e12,
                 self.peak_source)  # fmt: skip

    def add(self, out: dict[str, torch.Tensor]) -> None:
        loss = out["loss"].detach().float()
        parts = [loss, out["flow"].float(), out["jepa"].float(), torch.ones_like(loss), (~torch.isfinite(loss)).float()]
        self.sums += torch.stack(parts)
        self.count += 1

    def reset(self, world_size: int) -> dict[str, float]:
        """Zero the sums; returns images/s and achieved TFLOP/s (all ranks) since the last reset,
        and the share of the devices' peak."""
        seconds, self.since = max(time.perf_counter() - self.since, 1e-9), time.perf_counter()
        images, micro_batches, self.count = self.count * self.images_per_micro_batch, self.count, 0
        self.sums.zero_()
        flops = (self.flops or 0) * micro_batches * world_size / seconds
        return {"images_per_s": images / seconds, "tflops": flops / 1e12, "mfu": flops / (self.peak * world_size)}


def _end_epoch(run: Run, logger: RunLogger | None, epoch_end: int) -> None:
    """After the loader stopped: a whole epoch advances the counters, saves the epoch checkpoint
    and runs the grid and evaluation that are due; a part of one (a stop) saves checkpoint-last."""
    st = run.state
    if st.batch_in_epoch >= epoch_end:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        run.checkpoint.save_epoch(st.epoch)
        _epoch_grid_and_evaluation(run, logger)
    else:
        run.checkpoint.save("last")
    _log_epoch(run)


def _finish(run: Run, logger: RunLogger | None, stopped_by: int) -> dict:
    """train_log.json, then (unless a signal stopped the run) the evaluation and curves.png."""
    c, st = run.config, run.state
    if run.env.is_main:
        (run.out_dir / "train_log.json").write_text(json.dumps(run.history, indent=1))
    if stopped_by:
        log.info("stopped by signal %d at step %d; checkpoint-last.pth written", stopped_by, st.step)
        return {"stopped_by_signal": stopped_by, "step": st.step}
    result = {"train_seconds": st.train_seconds() - st.prior_seconds, "step": st.step}
    if run.parallel.compiled:
        result["compile"] = compile_report(run.parallel.compiled)
        log.info("torch.compile: %s", json.dumps(result["compile"]))
    if not c.eval.skip:
        result.update(run_evaluation(run, run.out_dir, logger))
    if run.env.is_main:
        write_curves(run.out_dir, f"{c.recipe}: {c.model.preset}, {st.step} steps")
    return result


def _open_logger(run: Run) -> RunLogger | None:
    c = run.config
    if not run.env.is_main:
        return None
    return RunLogger.open(parse_log_with(c.runtime.log_with), run.out_dir, config_record(c), c.runtime.wandb_project)


def _progress(run: Run) -> tqdm:
    return tqdm(
        total=len(run.loader),
        desc=f"epoch {run.state.epoch}",
        leave=False,
        dynamic_ncols=True,
        disable=not (interactive() and log.isEnabledFor(logging.INFO)),
    )


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


def _log(run: Run, logger: RunLogger | None, meter: StepMeter, applied: dict, bar: tqdm) -> None:
    """Read the accumulated losses back (the only host sync), summed over ranks; check finiteness;
    log. ``applied``: the schedule values of the last step, its grad norm and mask ratio."""
    st = run.state
    run.parallel.reduce_sum_(meter.sums)
    count, bad = int(meter.sums[3].item()), int(meter.sums[4].item())
    loss, flow, jepa = (meter.sums[:3] / max(count, 1)).tolist()
    if bad or not math.isfinite(loss):
        raise FloatingPointError(
            f"non-finite loss within the {count} steps ending at step {st.step}; the last checkpoint "
            "was written before it and is kept. Lower optim.lr or use --precision fp32 to investigate"
        )
    speed = meter.reset(run.env.world_size)
    values = {"loss": loss, "flow_loss": flow, "jepa_loss": jepa, **speed}
    values.update({k: applied[k] for k in ("lr", "weight_decay", "ema_momentum")})
    values.update(grad_norm=grad_norm_value(applied["grad_norm"]), mask_ratio=float(applied["mask_ratio"]))
    if bar.disable:
        log.info(
            "epoch %d step %d: loss %.4f (flow %.4f, jepa %.4f) lr %.2e grad norm %.3g, %.1f images/s, "
            "%.3g TFLOP/s = %.1f%% of peak", st.epoch, st.step, loss, flow, jepa, values["lr"], values["grad_norm"],
            speed["images_per_s"], speed["tflops"], 100 * speed["mfu"],
        )  # fmt: skip
    else:
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{values['lr']:.2e}", img_s=f"{speed['images_per_s']:.1f}")
    if logger is not None:
        for k, v in values.items():
            logger.add_scalar(f"train/{k}", v, st.step)
        run.history.append({"step": st.step, "elapsed_s": st.train_seconds(), **values})


def _log_epoch(run: Run) -> None:
    if run.history:
        h = run.history[-1]
        log.info(
            "epoch %d step %d loss %.4f (flow %.4f, jepa %.4f) lr %.2e  %.0fs",
            run.state.epoch,
            run.state.step,
            h["loss"],
            h["flow_loss"],
            h["jepa_loss"],
            h["lr"],
            h["elapsed_s"],
        )


def _epoch_grid_and_evaluation(run: Run, logger: RunLogger | None) -> None:
    """At the end of an epoch: the logged sample grid every ``grid_freq`` epochs and the
    evaluation every ``eval.freq`` epochs."""
    c, epoch = run.config, run.state.epoch
    if c.runtime.grid_freq and epoch % c.runtime.grid_freq == 0:
        ema = run.parallel.sampling_ema() if run.parallel.strategy == "fsdp" or run.env.is_main else None
        if ema is not None and logger is not None:
            grid, prompts = training_grid(generator(run, ema), run.captions.sample_captions(18), c.runtime.seed)
            logger.add_image("samples/ema", grid, run.state.step)
            logger.add_text("samples/prompts", " | ".join(prompts), run.state.step)
    if c.eval.freq and not c.eval.skip and epoch % c.eval.freq == 0:
        folder = run.out_dir / f"eval-epoch{epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        run_evaluation(run, folder, logger)


def generator(run: Run, ema: JEPAT) -> ImageGenerator:
    return ImageGenerator(
        ema, run.captions, run.tokenizer, run.config.sampling, run.env.device, run.config.runtime.precision
    )


def run_evaluation(run: Run, out_dir: Path, logger: RunLogger | None) -> dict:
    """The evaluation of the run's EMA (under FSDP a consolidated copy on every rank)."""
    return evaluate(
        generator(run, run.parallel.sampling_ema()),
        run.eval,
        out_dir,
        run.state.step,
        run.env,
        run.builtin_eval,
        {"checkpoint": run.config.runtime.resume or None},
        logger,
    )


def config_record(config: TrainConfig) -> dict:
    """The tree as flat ``section.name`` values (TensorBoard hparams text, W&B config)."""
    return {
        f"{section}.{k}": v
        for section, values in to_dict(config).items()
        if isinstance(values, dict)
        for k, v in values.items()
    }
