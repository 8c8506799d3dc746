"""Train (or evaluate) JEPA-T. With no arguments: the ``shapes`` recipe (tiny preset, built-in
procedural shapes, CPU is enough), followed by the judged shapes evaluation.

    python main_jepat.py                                       # the CPU demo recipe
    python main_jepat.py --recipe imagenet-base --data_path cache/in256   # the published recipe
    python main_jepat.py --resume output/shapes/checkpoint-last.pth      # continue exactly
    python main_jepat.py --evaluate --resume output/shapes/checkpoint-last.pth

Every setting comes from the recipe (util/recipes.py) unless a flag gives it; the resolved values
are written to ``<output_dir>/args.json``.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset

from engine_jepat import ModelInputs, StepSettings, param_groups, train_one_epoch
from models.flow_head import SAMPLERS
from models.jepat import FUSION_MODES, JEPAT, JEPAT_MODELS, build_model, config_dict
from models.loss import JEPATLoss
from models.sampler import CFG_SCHEDULES, SamplingConfig
from models.text_encoders import TEXT_ENCODERS
from models.tokenizers import TOKENIZERS, Tokenizer, build_tokenizer
from util.data.captions import CaptionStore, build_caption_store, caption_recipe
from util.data.datasets import DATASETS, ResumableSampler, build_dataset, collate, is_shapes_data
from util.data.latent_cache import CachedLatentDataset, CachedLatentInput
from util.evaluation.evaluate import (EvalOptions, add_evaluation_args, eval_options, evaluate,
                                      log_unseen, training_grid)
from util.evaluation.generate import ImageGenerator
from util.pretrained import build_generator, load_pretrained
from util.recipes import DEFAULT_RECIPE, RECIPES, apply_recipe, given, recipe_help
from util.runtime import PRECISIONS, DistEnv, init_runtime, resolve_precision, setup_logging, shutdown_runtime, user_errors
from util.training.checkpoint import TrainingCheckpoint, TrainState
from util.training.curves import write_curves
from util.training.loggers import LOGGERS, RunLogger, parse_log_with
from util.training.parallel import Parallel, add_distributed_args
from util.training.preflight import checkpoint_bytes, preflight
from util.training.schedules import Schedules

log = logging.getLogger("jepat")
SAMPLING_KEYS = ("num_iter", "cfg", "cfg_schedule", "temperature", "ode_steps", "sampler")


# ==================================================================== arguments
def float_or_none(text: str) -> float | None:
    """argparse type: a float, or 'none' for None."""
    if text.strip().lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'none', got {text!r}") from None


def int_or_none(text: str) -> int | None:
    return None if text.strip().lower() == "none" else int(text)


def _recipe_arg(g, name: str, help: str = "", **kw) -> None:
    """A flag whose default comes from the recipe (absent from the namespace unless given)."""
    g.add_argument(f"--{name}", default=argparse.SUPPRESS, help=f"{help} [{recipe_help(name)}]".lstrip(), **kw)


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and loss")
    _recipe_arg(g, "model", "preset", choices=sorted(JEPAT_MODELS))
    _recipe_arg(g, "img_size", type=int)
    _recipe_arg(g, "patch_size", "latent patch size", type=int)
    _recipe_arg(g, "tokenizer", choices=sorted(TOKENIZERS))
    _recipe_arg(g, "buffer_size", "buffer tokens (None: the preset's)", type=int_or_none)
    _recipe_arg(g, "mask_ratio_min", type=float)
    _recipe_arg(g, "mask_ratio_std", "std of the truncated normal (mean 1)", type=float)
    _recipe_arg(g, "cond_drop_prob", "CFG dropout probability", type=float)
    _recipe_arg(g, "diffusion_batch_mul", "flow draws per masked token", type=int)
    _recipe_arg(g, "qk_norm", action=argparse.BooleanOptionalAction)
    _recipe_arg(g, "t_logit_mean", "flow times t ~ sigmoid(N(mean, std)); 'none': uniform t", type=float_or_none)
    _recipe_arg(g, "t_logit_std", type=float)
    _recipe_arg(g, "flow_prediction", "the head outputs the velocity or the clean token", choices=("v", "x"))
    _recipe_arg(g, "fusion", "where the text enters", choices=FUSION_MODES)
    _recipe_arg(g, "flow_weight", type=float)
    _recipe_arg(g, "jepa_weight", type=float)
    _recipe_arg(g, "jepa_beta", "SmoothL1 beta of the JEPA loss", type=float)
    g = p.add_argument_group("text encoder (frozen)")
    _recipe_arg(g, "text_encoder", choices=sorted(TEXT_ENCODERS))
    _recipe_arg(g, "clip_model")
    _recipe_arg(g, "text_max_length", "caption tokens (0: the encoder's own default)", type=int)
    g.add_argument("--text_encoder_path", default=None,
                   help="clip: local open_clip checkpoint file or pretrained tag (e.g. openai); minilm: a model folder")


def add_data_and_optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (shapes: built in; imagenet: class folders; captions: a JSON Lines manifest; "
                             "webdataset: tar shards, a brace pattern or a folder; cached: a main_cache.py folder "
                             "as --data_path)")
    _recipe_arg(g, "dataset", choices=sorted(DATASETS))
    g.add_argument("--data_path", default="")
    _recipe_arg(g, "num_samples", "shapes: images per epoch", type=int)
    _recipe_arg(g, "num_workers", type=int)
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                   help="random horizontal flips (default: on for class folders, off for captions; from a cache "
                        "only if it holds flipped moments)")
    g.add_argument("--vae_path", default=None, help="kl16: kl16.ckpt file; sd-vae: diffusers folder")
    g = p.add_argument_group("optimisation")
    _recipe_arg(g, "batch_size", "per process", type=int)
    _recipe_arg(g, "epochs", type=int)
    g.add_argument("--lr", type=float, default=None, help="absolute lr (default: blr * global batch / 256)")
    _recipe_arg(g, "blr", "base lr per 256 images", type=float)
    g.add_argument("--min_lr", type=float, default=0.0)
    _recipe_arg(g, "lr_schedule", choices=("constant", "cosine"))
    _recipe_arg(g, "warmup_epochs", type=float)
    _recipe_arg(g, "weight_decay", type=float)
    g.add_argument("--weight_decay_end", type=float, default=None, help="cosine wd schedule end (default: constant)")
    _recipe_arg(g, "grad_clip", type=float)
    _recipe_arg(g, "ema_rate", "final EMA momentum", type=float)
    _recipe_arg(g, "ema_rate_start", "initial EMA momentum (cosine towards --ema_rate)", type=float)


def add_sampling_and_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (evaluation and grids; saved in the checkpoint as its defaults)")
    _recipe_arg(g, "num_iter", "unmasking iterations", type=int)
    _recipe_arg(g, "cfg", "guidance scale", type=float)
    _recipe_arg(g, "cfg_schedule", choices=CFG_SCHEDULES)
    _recipe_arg(g, "temperature", "initial-noise scale of the flow ODE", type=float)
    _recipe_arg(g, "ode_steps", type=int)
    _recipe_arg(g, "sampler", choices=SAMPLERS)
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="auto: bf16 on GPUs that have it and on CPUs with AVX512/AMX, else fp32")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--output_dir", default=None,
                   help="run folder (default: output/<recipe>; with --evaluate: eval-<checkpoint name> beside it)")
    g.add_argument("--resume", default="", help="checkpoint to resume from (model, EMA, optimizer, position)")
    g.add_argument("--save_freq", type=int, default=1, help="keep checkpoint-<epoch>.pth every N epochs")
    _recipe_arg(g, "save_every_steps", "also refresh checkpoint-last.pth every N steps (0: at epoch ends)", type=int)
    _recipe_arg(g, "log_freq", "steps between loss read-backs / log lines", type=int)
    g.add_argument("--max_steps", type=int, default=None, help="stop after this many optimizer steps (schedules still span --epochs)")
    _recipe_arg(g, "grid_freq", "epochs between logged sample grids (0: none)", type=int)
    g.add_argument("--log_with", type=parse_log_with, default="tensorboard",
                   help=f"comma list of {', '.join(LOGGERS)} (or none): where scalars, grids and evaluation figures go")
    g.add_argument("--wandb_project", default="jepat", help="W&B project (entity and mode: WANDB_ENTITY, WANDB_MODE)")
    g.add_argument("--evaluate", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--no_eval", action="store_true", help="skip the evaluation after training")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T training", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", default=DEFAULT_RECIPE, choices=sorted(RECIPES),
                   help="named settings (util/recipes.py) that every flag below overrides")
    add_model_args(p)
    add_data_and_optim_args(p)
    add_sampling_and_runtime_args(p)
    add_evaluation_args(p)
    add_distributed_args(p)
    return p


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Flags over the recipe, resolved."""
    return resolve_args(get_args_parser().parse_args(argv))


def resolve_args(args: argparse.Namespace) -> argparse.Namespace:
    apply_recipe(args)
    if args.output_dir is None and args.evaluate and args.resume:   # beside the checkpoint, never over a run
        args.output_dir = str(Path(args.resume).parent / f"eval-{Path(args.resume).stem}")
    elif args.output_dir is None:
        args.output_dir = f"output/{args.recipe}"
    return args


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(**{k: getattr(args, k) for k in SAMPLING_KEYS})


# ==================================================================== the run, built once
@dataclass
class Run:
    """Everything one training run holds, built once by ``build_run``."""
    args: argparse.Namespace
    env: DistEnv
    out_dir: Path
    tokenizer: Tokenizer                 # decodes grids and evaluation samples
    captions: CaptionStore
    model: JEPAT
    ema: JEPAT
    parallel: Parallel
    optimizer: torch.optim.Optimizer
    schedules: Schedules
    loader: DataLoader
    sampler: ResumableSampler
    inputs: ModelInputs
    settings: StepSettings
    state: TrainState
    checkpoint: TrainingCheckpoint
    eval: EvalOptions
    shapes: bool                         # trained on the shapes set: its judged evaluation applies
    steps_per_epoch: int


def make_model(args: argparse.Namespace, tokenizer: Tokenizer, text_info: Dict) -> JEPAT:
    grid = args.img_size // tokenizer.stride // args.patch_size
    kw = dict(token_dim=tokenizer.channels * args.patch_size ** 2, seq_len=grid * grid,
              text_token_dim=text_info["token_dim"], text_pooled_dim=text_info["pooled_dim"],
              mask_ratio_min=args.mask_ratio_min, mask_ratio_std=args.mask_ratio_std, cond_drop_prob=args.cond_drop_prob,
              diffusion_batch_mul=args.diffusion_batch_mul, qk_norm=args.qk_norm, fusion=args.fusion,
              flow_prediction=args.flow_prediction, t_logit_mean=args.t_logit_mean, t_logit_std=args.t_logit_std)
    if args.buffer_size is not None:
        kw["buffer_size"] = args.buffer_size
    return build_model(args.model, **kw)


def caption_recipe_of(args: argparse.Namespace) -> Dict:
    return caption_recipe(args.dataset, args.data_path, args.text_encoder, args.clip_model, args.text_encoder_path,
                          args.text_max_length)


@dataclass
class Data:
    """The training data: dataset, sampler, loader, batch -> model inputs, and how its captions were made."""
    dataset: Dataset
    sampler: ResumableSampler
    loader: DataLoader
    inputs: ModelInputs
    source: Dict


def build_data(args: argparse.Namespace, env: DistEnv, captions: CaptionStore, tokenizer: Tokenizer) -> Data:
    dataset = build_dataset(args.dataset, args.data_path, args.img_size, args.num_samples, args.seed,
                            args.random_flip)
    train_tokenizer = tokenizer
    if isinstance(dataset, CachedLatentDataset):
        dataset.check(args.tokenizer, args.img_size)  # refuses a cache of another tokenizer / resolution
        train_tokenizer = CachedLatentInput(tokenizer)
    if isinstance(dataset, CachedLatentDataset) and captions.table is not None:
        dataset.use_row_ids()        # batches carry caption-table rows: nothing per caption in memory
    else:
        vocabulary = dataset.caption_vocabulary()
        if len(vocabulary) <= captions.capacity:
            captions.add(vocabulary)   # every caption encoded once, before the first step
        log.info("%d unique captions (%s)%s", len(vocabulary), captions.info["name"],
                 "" if len(vocabulary) <= captions.capacity else f": more than the {captions.capacity} the store "
                 "keeps, so they are encoded as they come; cache them with main_cache.py to read them from disk")
    sampler = ResumableSampler(len(dataset), args.batch_size, seed=args.seed, rank=env.rank, world_size=env.world_size)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, collate_fn=collate,
                        num_workers=args.num_workers, drop_last=True, pin_memory=env.device.type == "cuda",
                        generator=torch.Generator().manual_seed(args.seed))  # keeps the global RNG untouched
    return Data(dataset, sampler, loader, ModelInputs(train_tokenizer, captions, args.patch_size, env.device),
                dataset.caption_source())


def plan_evaluation(args: argparse.Namespace, env: DistEnv, data: Data, captions: CaptionStore,
                    model: JEPAT) -> EvalOptions:
    """The evaluation after training (by default the training prompts), with everything it will
    need checked now: weights, references, prompt encodings, the output folder and its free disk."""
    options = eval_options(args, {} if args.no_eval else data.source, captions.sample_captions)
    will_generate = not args.no_eval and options.prompts is not None
    if will_generate and args.strategy == "fsdp" and env.world_size > 1:
        if args.eval_class_names or args.eval_prompts_file:
            raise SystemExit("a prompt-set evaluation needs the whole EMA on every rank: with --strategy fsdp pass "
                             "--no_eval and evaluate the saved (consolidated) checkpoint with --evaluate --resume")
        log.info("FSDP: the evaluation on the training prompts is left to --evaluate --resume on the saved "
                 "checkpoint (it needs the whole EMA on every rank)")
        options.prompts, will_generate = None, False
    if will_generate:
        log_unseen(options.prompts, captions.known)
        captions.require(options.prompts.prompts)
    preflight(Path(args.output_dir), checkpoint_bytes(model), options if will_generate else None)
    return options


def build_run(args: argparse.Namespace, env: DistEnv) -> Run:
    """Tokenizer, caption store, model, EMA, data, parallel wrapper, optimizer, schedules and the
    checkpoint, with the state of ``--resume`` restored and the later evaluation preflighted."""
    device, out_dir = env.device, Path(args.output_dir)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    tokenizer = build_tokenizer(args.tokenizer, args.vae_path).to(device)   # a missing VAE file stops here
    captions = build_caption_store(caption_recipe_of(args), device)
    model = make_model(args, tokenizer, captions.info).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()   # targets and samples without dropout
    log.info("model %s: %s", args.model, json.dumps(model.num_params()))
    data = build_data(args, env, captions, tokenizer)
    options = plan_evaluation(args, env, data, captions, model)
    ckpt = TrainingCheckpoint.load_weights(args.resume, model, ema) if args.resume else None
    steps_per_epoch = data.sampler.num_batches // args.accum_iter  # optimizer steps
    if steps_per_epoch < 1:
        raise SystemExit(f"--accum_iter {args.accum_iter} exceeds the {data.sampler.num_batches} batches of an epoch")
    total_steps = steps_per_epoch * args.epochs  # the schedules' length; --max_steps only stops early
    global_batch = args.batch_size * env.world_size * args.accum_iter
    lr = args.lr if args.lr is not None else args.blr * global_batch / 256
    loss = JEPATLoss(args.flow_weight, args.jepa_weight, args.jepa_beta)
    parallel = Parallel(env, model, ema, loss, args.strategy, args.precision, args.grad_checkpointing,
                        args.compile_backend if args.compile else None)
    optimizer = torch.optim.AdamW(param_groups(model), lr=lr, betas=(0.9, 0.95), weight_decay=args.weight_decay,
                                  fused=device.type == "cuda")
    schedules = Schedules.build(lr, args.warmup_epochs, steps_per_epoch, total_steps, args.lr_schedule, args.min_lr,
                                args.weight_decay, args.weight_decay_end, args.ema_rate_start, args.ema_rate)
    state = TrainState()
    state.host_generator.manual_seed(args.seed)
    record = {"model_config": config_dict(model), "sampling": asdict(sampling_config(args)),
              "captions": {**caption_recipe_of(args), **captions.info, "source": data.source},
              "image": {"tokenizer": args.tokenizer, "vae_path": args.vae_path, "patch_size": args.patch_size,
                        "img_size": args.img_size}, "args": vars(args)}
    checkpoint = TrainingCheckpoint(out_dir, parallel, optimizer, state, record)
    if ckpt is not None:
        checkpoint.restore(ckpt)
        log.info("resumed %s at epoch %d, batch %d, step %d", args.resume, state.epoch, state.batch_in_epoch, state.step)
    log.info("%d process(es) x batch %d x accum %d = global batch %d, lr %.3g, strategy %s (backend %s), AdamW fused=%s",
             env.world_size, args.batch_size, args.accum_iter, global_batch, lr, parallel.strategy,
             torch.distributed.get_backend() if env.initialized else "none", optimizer.defaults.get("fused"))
    if env.is_main:
        with open(out_dir / "args.json", "w") as f:
            json.dump({**vars(args), "resolved_lr": lr, "total_steps": total_steps, "world_size": env.world_size,
                       "global_batch": global_batch, "model_config": config_dict(model)}, f, indent=2)
    settings = StepSettings(args.precision, args.grad_clip, args.accum_iter, args.log_freq, args.max_steps, args.seed)
    return Run(args, env, out_dir, tokenizer, captions, model, ema, parallel, optimizer, schedules, data.loader,
               data.sampler, data.inputs, settings, state, checkpoint, options, data.source.get("kind") == "shapes",
               steps_per_epoch)


# ==================================================================== the loop's companions
class StopSignals:
    """SIGTERM / SIGUSR1 (preemption) on any rank stop every rank at the same step. The handlers
    live only as long as the ``with`` block."""

    def __init__(self, env: DistEnv) -> None:
        self.env, self.signal, self._saved = env, 0, {}
        self._received = 0   # written only by the handler, so an all-reduce in flight cannot overwrite it

    def __enter__(self) -> "StopSignals":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            self._saved[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum, frame) -> None:
        self._received = signum

    def requested(self) -> bool:
        """Whether any rank got a signal; all ranks agree (a host-side all-reduce, no GPU sync).
        A signal that lands while the all-reduce waits is seen at the next call, never lost."""
        self.signal = max(self.signal, self.env.max_over_ranks(self._received))
        return self.signal != 0


class RunMonitor:
    """What the engine reports to: the loggers (TensorBoard, W&B), the history written to
    train_log.json, checkpoints every ``--save_every_steps`` steps, stop signals and ``--max_steps``."""

    def __init__(self, run: Run, signals: StopSignals, logger: Optional[RunLogger], history: List[Dict]) -> None:
        self.run, self.signals, self.logger, self.history = run, signals, logger, history

    def log(self, step: int, values: Dict[str, float]) -> None:
        if self.logger is None:
            return
        for k, v in values.items():
            self.logger.add_scalar(f"train/{k}", v, step)
        self.history.append({"step": step, "elapsed_s": self.run.state.train_seconds(), **values})

    def after_step(self, state: TrainState) -> bool:
        args = self.run.args
        if args.save_every_steps and state.step % args.save_every_steps == 0:
            self.run.checkpoint.save("last")
        return self.signals.requested() or (args.max_steps is not None and state.step >= args.max_steps)


def end_of_epoch(run: Run, monitor: RunMonitor) -> None:
    """Epoch counters, checkpoints, the logged sample grid and the online evaluation."""
    args, st = run.args, run.state
    whole = st.batch_in_epoch >= run.steps_per_epoch * args.accum_iter
    if whole:
        st.epoch, st.batch_in_epoch = st.epoch + 1, 0
        if args.save_freq and st.epoch % args.save_freq == 0:
            run.checkpoint.save(str(st.epoch))
    run.checkpoint.save("last")
    if whole and args.grid_freq and st.epoch % args.grid_freq == 0:
        ema = run.parallel.sampling_ema() if run.parallel.strategy == "fsdp" or run.env.is_main else None
        if ema is not None and monitor.logger is not None:
            grid, prompts = training_grid(generator(run, ema), run.captions.sample_captions(18), args.seed)
            monitor.logger.add_image("samples/ema", grid, st.step)
            monitor.logger.add_text("samples/prompts", " | ".join(prompts), st.step)
    if whole and args.eval_freq and not args.no_eval and st.epoch % args.eval_freq == 0:
        folder = run.out_dir / f"eval-epoch{st.epoch:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        run_evaluation(run, folder, monitor.logger)
    if monitor.history:
        h = monitor.history[-1]
        log.info("epoch %d step %d loss %.4f (flow %.4f, jepa %.4f) lr %.2e  %.0fs", st.epoch, st.step, h["loss"],
                 h["flow_loss"], h["jepa_loss"], h["lr"], h["elapsed_s"])


def generator(run: Run, ema: JEPAT) -> ImageGenerator:
    return ImageGenerator(ema, run.captions, run.tokenizer, sampling_config(run.args), run.env.device,
                          run.args.precision)


def run_evaluation(run: Run, out_dir: Path, logger: Optional[RunLogger]) -> Dict:
    """The evaluation of the run's EMA (under FSDP a consolidated copy: rank 0 only)."""
    ema = run.parallel.sampling_ema()
    if ema is None:
        return {}
    return evaluate(generator(run, ema), run.eval, out_dir, run.state.step, run.env, run.shapes,
                    {"checkpoint": run.args.resume or None}, logger)


def earlier_history(run: Run) -> List[Dict]:
    """The rows of train_log.json up to the resumed step, so a resumed run's log and curves go on."""
    path = run.out_dir / "train_log.json"
    if not run.args.resume or not run.env.is_main or not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if r.get("step", 0) <= run.state.step]


def train(run: Run) -> Dict:
    """Epochs until ``--epochs`` (or ``--max_steps``, or a stop signal), then the evaluation, and
    (rank 0) train_log.json and curves.png."""
    args, st = run.args, run.state
    logger = RunLogger.open(args.log_with, run.out_dir, vars(args), args.wandb_project) if run.env.is_main else None
    stop_step = st.step + 10 ** 12 if args.max_steps is None else args.max_steps
    try:
        with StopSignals(run.env) as signals:
            monitor = RunMonitor(run, signals, logger, earlier_history(run))
            st.started = time.time()
            while st.epoch < args.epochs and st.step < stop_step and not signals.requested():
                run.sampler.set_position(st.epoch, st.batch_in_epoch)
                train_one_epoch(run.parallel, run.loader, run.optimizer, run.inputs, run.schedules, st, run.settings,
                                monitor)
                end_of_epoch(run, monitor)
        if run.env.is_main:
            (run.out_dir / "train_log.json").write_text(json.dumps(monitor.history, indent=1))
        if signals.signal:
            log.info("stopped by signal %d at step %d; checkpoint-last.pth written", signals.signal, st.step)
            return {"stopped_by_signal": signals.signal, "step": st.step}
        result = {"train_seconds": st.train_seconds() - st.prior_seconds, "step": st.step}
        if not args.no_eval:
            result.update(run_evaluation(run, run.out_dir, logger))
        if run.env.is_main:
            write_curves(run.out_dir, f"{args.recipe}: {args.model}, {st.step} steps")
        return result
    finally:
        if logger is not None:
            logger.close()


# ==================================================================== evaluation of a saved checkpoint
def training_captions(captions: CaptionStore, recipe: Dict, source: Dict) -> Optional[Callable[[int], List[str]]]:
    """Up to n training captions of a caption-data checkpoint, spread over all of them: from the
    cache's caption table, or from the dataset's listing."""
    if source.get("kind") != "caption":
        return None
    if captions.table is not None:
        return captions.sample_captions
    vocabulary = build_dataset(recipe["dataset"], recipe["data_path"]).caption_vocabulary()
    return lambda n: vocabulary[::max(1, len(vocabulary) // n)][:n]


def evaluate_checkpoint(args: argparse.Namespace, env: DistEnv) -> Dict:
    """``--evaluate --resume CKPT_OR_FOLDER``: a checkpoint or model folder rebuilds its own model,
    caption store and tokenizer; it is evaluated on its training prompts unless prompt flags say
    otherwise, with its own sampling settings unless a flag gives another value."""
    if not args.resume:
        raise SystemExit("--evaluate needs --resume CHECKPOINT (a checkpoint-*.pth or a model folder)")
    pretrained = load_pretrained(args.resume)
    overrides = {k: getattr(args, k) for k in ("text_encoder_path", "data_path") if getattr(args, k)}
    gen = build_generator(pretrained, env.device, args.precision, given(args, SAMPLING_KEYS), overrides,
                          args.vae_path, use_text_cache=True)
    recipe = {**pretrained.recipe["captions"], **overrides}
    source = recipe.get("source") or (   # format-1 checkpoints did not record it
        {"kind": "shapes"} if is_shapes_data(recipe["dataset"], recipe["data_path"]) else {})
    options = eval_options(args, source, training_captions(gen.captions, recipe, source))
    if options.prompts is not None:
        if source.get("class_prompts"):   # the training captions are known: class prompts, or a cache's table
            trained = set(source["class_prompts"])
            log_unseen(options.prompts, lambda ps: [p in trained for p in ps])
        elif gen.captions.table is not None:
            log_unseen(options.prompts, gen.captions.known)
        gen.captions.require(options.prompts.prompts)
    preflight(Path(args.output_dir), 0, options)
    logger = RunLogger.open(args.log_with, Path(args.output_dir), vars(args)) if env.is_main else None
    try:
        return evaluate(gen, options, Path(args.output_dir), pretrained.step, env, source.get("kind") == "shapes",
                        {"checkpoint": args.resume}, logger)
    finally:
        if logger is not None:
            logger.close()


def main(args: argparse.Namespace) -> Dict:
    """One process, or one rank of a torchrun launch."""
    args = resolve_args(args)
    env = init_runtime(args.device, args.dist_timeout_min)
    setup_logging(env)
    try:
        args.precision = resolve_precision(env.device, args.precision)
        log.info("device %s, precision %s, recipe %s", env.device, args.precision, args.recipe)
        if args.evaluate:
            return evaluate_checkpoint(args, env)
        return train(build_run(args, env))
    finally:
        shutdown_runtime(env)


if __name__ == "__main__":
    with user_errors():
        main(parse_args())
