"""Train (or evaluate) JEPA-T. With no arguments: the tiny preset on the built-in ``shapes``
set, on the CPU (or the GPU when there is one), followed by the judged shapes evaluation.

    python main_jepat.py                                  # the built-in default
    python main_jepat.py --resume output/x/checkpoint-last.pth   # continue exactly
    python main_jepat.py --evaluate --resume output/x/checkpoint-last.pth
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import signal
import time
from pathlib import Path
from typing import Dict, Optional

import torch
from torch.utils.data import DataLoader

from torchvision.utils import make_grid

from engine_jepat import Schedules, TrainState, generate_images, param_groups, train_one_epoch
from models.jepat import FUSION_MODES, JEPAT, JEPAT_MODELS, build_model, config_dict
from models.sampler import CFG_SCHEDULES, SamplingConfig
from models.flow_head import SAMPLERS
from models.text_encoders import TEXT_ENCODERS, build_text_encoder
from models.tokenizers import TOKENIZERS, build_tokenizer
from util.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from util.datasets import DATASETS, ResumableSampler, build_dataset, collate
from util.eval_cli import add_evaluation_args, evaluate_generation, finish_shapes, online_eval_dir, prompt_set
from util.dist import DistEnv, Parallel, add_distributed_args, destroy_distributed, init_distributed
from util.metrics import evaluate_shapes
from util.schedules import CosineValue, LRSchedule, WeightDecaySchedule
from util.latent_cache import CachedLatentDataset, CachedLatentInput, read_meta
from util.text_cache import TextEmbeddingTable, load_text_cache, save_text_cache, text_cache_key

log = logging.getLogger("jepat")


def float_or_none(text: str) -> float | None:
    """argparse type: a float, or 'none' for None."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default="tiny", choices=sorted(JEPAT_MODELS), help="preset")
    g.add_argument("--img_size", type=int, default=24)
    g.add_argument("--patch_size", type=int, default=4, help="latent patch size")
    g.add_argument("--tokenizer", default="pixels", choices=sorted(TOKENIZERS))
    g.add_argument("--buffer_size", type=int, default=None, help="buffer tokens (default: the preset's)")
    g.add_argument("--mask_ratio_min", type=float, default=0.2, help="published recipe: 0.7")
    g.add_argument("--mask_ratio_std", type=float, default=0.5, help="std of the truncated normal (mean 1); published: 0.25")
    g.add_argument("--cond_drop_prob", type=float, default=0.1, help="CFG dropout probability")
    g.add_argument("--diffusion_batch_mul", type=int, default=2, help="published recipe: 4")
    g.add_argument("--qk_norm", action="store_true")
    g.add_argument("--t_logit_mean", type=float_or_none, default=-0.8,
                   help="flow training times t ~ sigmoid(N(mean, std)); 'none': uniform t (published)")
    g.add_argument("--t_logit_std", type=float, default=0.8)
    g.add_argument("--flow_prediction", default="x", choices=("v", "x"),
                   help="flow head outputs the velocity or the clean token (x suits pixel patches)")
    g.add_argument("--fusion", default="full", choices=FUSION_MODES)
    g = p.add_argument_group("text encoder (frozen)")
    g.add_argument("--text_encoder", default="minilm", choices=sorted(TEXT_ENCODERS))
    g.add_argument("--text_encoder_path", default=None,
                   help="clip: local open_clip checkpoint file or pretrained tag (e.g. openai)")
    g.add_argument("--clip_model", default="ViT-L-14")
    g.add_argument("--text_max_length", type=int, default=16, help="caption tokens (0: the encoder's own default)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="shapes", choices=sorted(DATASETS))
    g.add_argument("--data_path", default="")
    g.add_argument("--num_samples", type=int, default=16000, help="shapes: images per epoch")
    g.add_argument("--num_workers", type=int, default=0)
    g = p.add_argument_group("real data and caches (imagenet: class folders; captions: a JSON Lines manifest; "
                             "cached: a main_cache.py folder as --data_path)")
    g.add_argument("--vae_path", default=None, help="kl16: kl16.ckpt file; sd-vae: diffusers folder")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch_size", type=int, default=16, help="per process")
    g.add_argument("--epochs", type=int, default=3)
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * batch / 256)")
    g.add_argument("--blr", type=float, default=0.0112, help="base lr per 256 images (published recipe: 1e-4)")
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--lr_schedule", default="cosine", choices=("constant", "cosine"))
    g.add_argument("--warmup_epochs", type=float, default=0.4)
    g.add_argument("--weight_decay", type=float, default=0.02)
    g.add_argument("--weight_decay_end", type=float, default=None, help="cosine wd schedule end (default: constant)")
    g.add_argument("--grad_clip", type=float, default=3.0)
    g.add_argument("--ema_rate", type=float, default=0.999, help="final EMA momentum (published: 0.9999)")
    g.add_argument("--ema_rate_start", type=float, default=0.99, help="initial EMA momentum")
    g.add_argument("--flow_weight", type=float, default=1.0)
    g.add_argument("--jepa_weight", type=float, default=1.0)
    g = p.add_argument_group("sampling (evaluation and grids)")
    g.add_argument("--num_iter", type=int, default=16, help="published recipe: 64")
    g.add_argument("--cfg", type=float, default=3.0)
    g.add_argument("--cfg_schedule", default="linear", choices=CFG_SCHEDULES)
    g.add_argument("--temperature", type=float, default=0.05, help="initial-noise scale of the flow ODE (published: 0.95)")
    g.add_argument("--ode_steps", type=int, default=20)
    g.add_argument("--sampler", default="heun", choices=SAMPLERS)
    g.add_argument("--eval_per_combo", type=int, default=16, help="shapes evaluation: images per color-shape combination")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"),
                   help="auto: bf16 on GPUs that have it and on CPUs with AVX512/AMX, else fp32 (see README)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output_dir", default="output/tiny_shapes")
    g.add_argument("--resume", default="", help="checkpoint to resume from (model, EMA, optimizer, position)")
    g.add_argument("--save_freq", type=int, default=1, help="keep checkpoint-<epoch>.pth every N epochs")
    g.add_argument("--save_every_steps", type=int, default=0, help="also refresh checkpoint-last.pth every N steps")
    g.add_argument("--log_freq", type=int, default=50, help="steps between loss read-backs / logs")
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (schedules still span --epochs)")
    g.add_argument("--grid_freq", type=int, default=1, help="epochs between TensorBoard sample grids (0: none)")
    g.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--no_eval", action="store_true", help="skip the evaluation after training")
    add_evaluation_args(p)
    add_distributed_args(p)
    return p


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 where it is fast. On CPUs without AVX512/AMX (AVX2 only), bf16 matmuls
    are emulated and measured 10-100x slower than fp32 (benchmarks/README.md), so fp32."""
    if device.type == "cuda":
        if precision in ("auto", "bf16") and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16; using fp16 with a GradScaler")
            return "fp16"
        return "bf16" if precision == "auto" else precision
    if precision == "auto":
        capability = torch.backends.cpu.get_cpu_capability()
        return "bf16" if ("AVX512" in capability or "AMX" in capability) else "fp32"
    if precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def make_model(args: argparse.Namespace, tokenizer, text_encoder) -> JEPAT:
    grid = args.img_size // tokenizer.stride // args.patch_size
    kw = dict(token_dim=tokenizer.channels * args.patch_size ** 2, seq_len=grid * grid,
              text_token_dim=text_encoder.token_dim, text_pooled_dim=text_encoder.pooled_dim,
              mask_ratio_min=args.mask_ratio_min, mask_ratio_std=args.mask_ratio_std, cond_drop_prob=args.cond_drop_prob,
              diffusion_batch_mul=args.diffusion_batch_mul, qk_norm=args.qk_norm, fusion=args.fusion,
              flow_prediction=args.flow_prediction, t_logit_mean=args.t_logit_mean, t_logit_std=args.t_logit_std)
    if args.buffer_size is not None:
        kw["buffer_size"] = args.buffer_size
    return build_model(args.model, **kw)


def cached_text_dir(args: argparse.Namespace) -> Path | None:
    """Where a latent cache keeps this text encoder's caption embeddings (None unless --dataset cached)."""
    if args.dataset != "cached":
        return None
    key = text_cache_key(args.text_encoder, args.text_max_length, args.clip_model, args.text_encoder_path)
    return Path(args.data_path) / "text" / key


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(num_iter=args.num_iter, cfg=args.cfg, cfg_schedule=args.cfg_schedule,
                          temperature=args.temperature, ode_steps=args.ode_steps, sampler=args.sampler)


def check_compatible(ckpt: Dict, model: JEPAT, path: str) -> None:
    """A checkpoint must match the model built from the arguments (preset, tokens, text dims)."""
    saved, now = ckpt["model_config"], config_dict(model)
    if saved.get("preset") != now["preset"]:
        raise ValueError(f"checkpoint {path} holds a '{saved.get('preset')}' model but --model is "
                         f"'{now['preset']}'; pass --model {saved.get('preset')}")
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise ValueError(f"checkpoint {path} does not match the arguments: "
                         + ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items()))


def main(args: argparse.Namespace) -> Dict:
    """One process, or one rank of a torchrun launch (see util/dist.py)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    env = init_distributed(args.device, args.dist_timeout_min)
    if not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)  # rank 0 logs, writes grids and checkpoints
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        return train(args, env)
    finally:
        for sig, handler in handlers.items():  # the preemption handlers live only as long as the run
            signal.signal(sig, handler)
        destroy_distributed(env)


def train(args: argparse.Namespace, env: DistEnv) -> Dict:
    device = env.device
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    args.precision = resolve_precision(device, args.precision)
    log.info("device %s, precision %s", device, args.precision)

    tokenizer = build_tokenizer(args.tokenizer, args.vae_path).to(device)
    text_dir = cached_text_dir(args)
    text_cache = load_text_cache(text_dir, device) if text_dir is not None else None
    if text_cache is not None:  # cached caption embeddings: the text encoder is never built
        text_table, text_encoder = text_cache
    else:
        text_encoder = build_text_encoder(args.text_encoder, path=args.text_encoder_path, clip_model=args.clip_model,
                                          max_length=args.text_max_length or None, device=str(device))
        text_table = TextEmbeddingTable(text_encoder, device)
    model = make_model(args, tokenizer, text_encoder).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # targets and samples without dropout
    log.info("model %s: %s", args.model, json.dumps(model.num_params()))

    ckpt = None
    if args.resume:
        ckpt = load_checkpoint(args.resume, expect_preset=args.model)
        check_compatible(ckpt, model, args.resume)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
    if args.evaluate:
        if ckpt is None:
            raise SystemExit("--evaluate needs --resume CHECKPOINT")
        writer = None
        if env.is_main:
            from torch.utils.tensorboard import SummaryWriter
            writer = SummaryWriter(str(out_dir / "tb"))
        try:
            return evaluate_on_ranks(args, env, ema, text_table, tokenizer, device, out_dir, ckpt["state"]["step"], writer)
        finally:
            if writer is not None:
                writer.close()

    if args.strategy == "fsdp" and env.world_size > 1 and not args.no_eval and prompt_set(args) is not None:
        raise SystemExit("a prompt-set evaluation needs the whole EMA on every rank: with --strategy fsdp pass "
                         "--no_eval and evaluate the saved (consolidated) checkpoint with --evaluate --resume")
    dataset = build_dataset(args.dataset, args.data_path, args.img_size, args.num_samples, args.seed)
    if hasattr(dataset, "caption_vocabulary"):
        text_table.add(dataset.caption_vocabulary())
        log.info("cached %d unique caption embeddings (%s)", len(text_table), args.text_encoder)
    train_tokenizer = tokenizer
    if isinstance(dataset, CachedLatentDataset):
        dataset.check(args.tokenizer, args.img_size)  # refuses a cache of another tokenizer / resolution
        train_tokenizer = CachedLatentInput(tokenizer)
        if text_cache is None and text_dir is not None and env.is_main:
            save_text_cache(text_dir, text_table)  # the next run reads it instead of building the encoder
    sampler = ResumableSampler(len(dataset), args.batch_size, seed=args.seed, rank=env.rank, world_size=env.world_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=args.num_workers, drop_last=True, pin_memory=device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    steps_per_epoch = sampler.num_batches // args.accum_iter  # optimizer steps
    if steps_per_epoch < 1:
        raise SystemExit(f"--accum_iter {args.accum_iter} exceeds the {sampler.num_batches} batches of an epoch")
    total_steps = steps_per_epoch * args.epochs  # the schedules' length; --max_steps only stops early
    global_batch = args.batch_size * env.world_size * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * global_batch / 256
    parallel = Parallel(env, model, ema, args.strategy, args.precision, args.grad_checkpointing, args.compile,
                        args.compile_backend, find_unused_parameters=args.fusion != "full"
                        or not (args.flow_weight > 0 and args.jepa_weight > 0))
    optimizer = torch.optim.AdamW(param_groups(model), lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    schedules = Schedules(
        lr=LRSchedule(lr, int(args.warmup_epochs * steps_per_epoch), total_steps, args.lr_schedule, args.min_lr),
        weight_decay=WeightDecaySchedule(args.weight_decay, args.weight_decay if args.weight_decay_end is None
                                         else args.weight_decay_end, total_steps),
        ema=CosineValue(args.ema_rate if args.ema_rate_start is None else args.ema_rate_start, args.ema_rate,
                        total_steps))
    scaler = torch.amp.GradScaler(device.type) if args.precision == "fp16" else None
    state = TrainState()
    state.host_generator.manual_seed(args.seed)
    prior_seconds = 0.0  # training time of the runs this one resumes
    if ckpt is not None:
        parallel.load_optimizer_state(optimizer, ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        s = ckpt["state"]
        state.step, state.epoch, state.batch_in_epoch = s["step"], s["epoch"], s["batch_in_epoch"]
        state.host_generator.set_state(s["host_generator"])
        prior_seconds = s.get("train_seconds", 0.0)
        set_rng_state(ckpt["rng"])
        log.info("resumed %s at epoch %d, batch %d, step %d", args.resume, state.epoch, state.batch_in_epoch, state.step)
    log.info("%d process(es) x batch %d x accum %d = global batch %d, lr %.3g, strategy %s",
             env.world_size, args.batch_size, args.accum_iter, global_batch, lr, parallel.strategy)
    if env.is_main:
        with open(out_dir / "args.json", "w") as f:
            json.dump({**vars(args), "resolved_lr": lr, "total_steps": total_steps, "world_size": env.world_size,
                       "global_batch": global_batch, "model_config": config_dict(model)}, f, indent=2)

    from torch.utils.tensorboard import SummaryWriter
    writer = SummaryWriter(str(out_dir / "tb")) if env.is_main else None
    history = []

    def log_fn(step: int, values: Dict[str, float]) -> None:
        if writer is None:
            return
        for k, v in values.items():
            writer.add_scalar(f"train/{k}", v, step)
        history.append({"step": step, "elapsed_s": time.time() - start_time, **values})

    def checkpoint(tag: str) -> None:
        if not parallel.all_finite():
            raise FloatingPointError(f"non-finite weights at step {state.step}; not overwriting the last good "
                                     f"checkpoint in {out_dir}. Lower --lr or use --precision fp32 to investigate")
        parallel.check_replicas()
        # full state dicts on rank 0 (FSDP gathers shards: every rank takes part); plain for any strategy
        model_sd, ema_sd, optim_sd = parallel.model_state(), parallel.ema_state(), parallel.optimizer_state(optimizer)
        if not env.is_main:
            return
        save_checkpoint(out_dir / f"checkpoint-{tag}.pth", {
            "model": model_sd, "ema": ema_sd, "model_config": config_dict(model),
            "optimizer": optim_sd, "scaler": scaler.state_dict() if scaler else None,
            "state": {"step": state.step, "epoch": state.epoch, "batch_in_epoch": state.batch_in_epoch,
                      "host_generator": state.host_generator.get_state(),
                      "train_seconds": prior_seconds + time.time() - start_time},
            "rng": rng_state(), "args": vars(args),
            "text_encoder": {"name": args.text_encoder, "token_dim": text_encoder.token_dim,
                             "pooled_dim": text_encoder.pooled_dim, "max_length": text_encoder.max_length},
            "tokenizer": args.tokenizer, "patch_size": args.patch_size, "img_size": args.img_size,
        })

    stop = {"signal": None}

    def on_signal(signum, frame) -> None:
        stop["signal"] = signum
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    def stopping() -> bool:
        """Whether any rank got a signal; all ranks agree (a host-side all-reduce, no GPU sync)."""
        stop["signal"] = env.max_over_ranks(stop["signal"] or 0) or None
        return stop["signal"] is not None

    def step_hook(st: TrainState) -> bool:
        if args.save_every_steps and st.step % args.save_every_steps == 0:
            checkpoint("last")
        return stopping() or (args.max_steps is not None and st.step >= args.max_steps)

    def eval_model() -> Optional[JEPAT]:
        """The EMA to sample from: every rank's own copy (one process, DDP), or under FSDP a
        consolidated copy on rank 0 (a collective; None elsewhere)."""
        return parallel.plain_ema() if args.strategy == "fsdp" else parallel.ema

    start_time = time.time()
    stop_step = total_steps if args.max_steps is None else min(total_steps, args.max_steps)
    while state.epoch < args.epochs and state.step < stop_step and not stopping():
        sampler.set_position(state.epoch, state.batch_in_epoch)
        train_one_epoch(model, ema, loader, optimizer, train_tokenizer, text_table, args.patch_size, schedules, state,
                        device, args.precision, scaler, args.grad_clip, args.flow_weight, args.jepa_weight,
                        args.log_freq, log_fn, max_steps=args.max_steps, step_hook=step_hook,
                        accum_iter=args.accum_iter, train_module=parallel.train_module, grad_sync=parallel.grad_sync,
                        reduce_sum_=parallel.reduce_sum_ if env.initialized else None, seed=args.seed,
                        shard=env.rank)
        if state.batch_in_epoch >= steps_per_epoch * args.accum_iter:
            state.epoch += 1
            state.batch_in_epoch = 0
            if args.save_freq and state.epoch % args.save_freq == 0:
                checkpoint(str(state.epoch))
        checkpoint("last")
        if args.grid_freq and state.batch_in_epoch == 0 and state.epoch % args.grid_freq == 0:
            grid_ema = parallel.plain_ema()  # FSDP: consolidated on rank 0
            if env.is_main:
                log_sample_grid(writer, grid_ema, text_table, tokenizer, args, device, state.step)
        eval_dir = online_eval_dir(args, out_dir, state.epoch) if state.batch_in_epoch == 0 else None
        if eval_dir is not None:
            evaluate_on_ranks(args, env, eval_model(), text_table, tokenizer, device, eval_dir, state.step, writer)
        if history:
            h = history[-1]
            log.info("epoch %d step %d loss %.4f (flow %.4f, jepa %.4f) lr %.2e  %.0fs",
                     state.epoch, state.step, h["loss"], h["flow_loss"], h["jepa_loss"], h["lr"], h["elapsed_s"])
    train_seconds = time.time() - start_time
    if env.is_main:
        with open(out_dir / "train_log.json", "w") as f:
            json.dump(history, f, indent=1)
    if stop["signal"] is not None:
        log.info("stopped by signal %d at step %d; checkpoint-last.pth written", stop["signal"], state.step)
        if writer is not None:
            writer.close()
        return {"stopped_by_signal": stop["signal"], "step": state.step}
    result = {"train_seconds": train_seconds, "step": state.step}
    if not args.no_eval:
        result.update(evaluate_on_ranks(args, env, eval_model(), text_table, tokenizer, device, out_dir, state.step,
                                        writer))
    if writer is not None:
        writer.close()
    return result


def log_sample_grid(writer, ema: JEPAT, text_table: TextEmbeddingTable, tokenizer, args: argparse.Namespace,
                    device: torch.device, step: int, max_prompts: int = 18) -> None:
    """A TensorBoard grid from the EMA model: one image for each of a spread of known captions."""
    captions = text_table.captions()
    if not captions:
        return
    stride = max(1, len(captions) // max_prompts)
    prompts = captions[::stride][:max_prompts]
    images = generate_images(ema, text_table, tokenizer, prompts, sampling_config(args), args.patch_size,
                             args.seed, device, args.precision)
    writer.add_image("samples/ema", make_grid((images + 1) / 2, nrow=6, padding=1), step)
    writer.add_text("samples/prompts", " | ".join(prompts), step)


def evaluate_on_ranks(args, env: DistEnv, ema: Optional[JEPAT], text_table, tokenizer, device, out_dir, step,
                      writer=None) -> Dict:
    """A prompt-set evaluation (class names, prompts file) is shared by all ranks, each with the
    whole EMA; the dataset's own evaluation (shapes) runs on rank 0 alone."""
    if env.world_size > 1 and prompt_set(args) is not None:
        if ema is None:
            raise SystemExit("a prompt-set evaluation needs the whole EMA on every rank; with --strategy fsdp "
                             "evaluate the saved (consolidated) checkpoint with --evaluate --resume instead")
        return run_evaluation(args, ema, text_table, tokenizer, device, out_dir, step, writer if env.is_main else None)
    if not env.is_main:
        return {}
    return run_evaluation(args, ema, text_table, tokenizer, device, out_dir, step, writer)


def run_evaluation(args, ema, text_table, tokenizer, device, out_dir, step, writer=None) -> Dict:
    generated = evaluate_generation(args, ema, text_table, tokenizer, device, out_dir, step, sampling_config(args), writer)
    if generated is not None:
        return generated
    shapes_cache = args.dataset == "cached" and read_meta(args.data_path)["root"].startswith("shapes(")
    if args.dataset != "shapes" and not shapes_cache:
        log.info("no built-in evaluation for dataset %s", args.dataset)
        return {}
    metrics = evaluate_shapes(ema, text_table, tokenizer, sampling_config(args), args.patch_size, out_dir,
                              per_combo=args.eval_per_combo, seed=args.seed, device=device,
                              precision=args.precision, step=step, checkpoint=args.resume or None)
    if writer is not None:
        for split in ("seen", "heldout"):
            for k in ("color_acc", "shape_acc", "joint_acc"):
                writer.add_scalar(f"eval/{split}_{k}", metrics[split][k], step)
    return finish_shapes(args, metrics, ema, tokenizer, device, out_dir, step, writer)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
