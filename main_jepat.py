"""Train (or evaluate) JEPA-T. With no arguments: the ``shapes`` recipe (tiny preset, built-in
procedural shapes, CPU is enough), followed by the judged shapes evaluation (``--config pairs``:
two objects in a relation, and its judged evaluation).

    python main_jepat.py                                             # the CPU demo (configs/shapes.yaml)
    python main_jepat.py --config imagenet-base --data_path cache/in256     # the published recipe
    python main_jepat.py --config my_run.yaml optim.batch_size=64           # an experiment file + overrides
    python main_jepat.py --resume output/shapes/checkpoint-last.pth        # continue exactly
    python main_jepat.py --evaluate --resume output/shapes/checkpoint-last.pth

Every setting lives in the configuration tree of util/config.py; recipes in configs/ override its
defaults, flags and ``section.name=value`` override the recipe. The resolved tree is written to
``<output_dir>/config.yaml`` and stored in every checkpoint.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from engine_jepat import ModelInputs, Run, config_record, param_groups, train
from models.jepat import JEPAT, JEPATConfig, build_model, config_dict
from models.tokenizers import Tokenizer, build_tokenizer
from util.config import (
    DEFAULT_RECIPE,
    ConfigError,
    ModelConfig,
    TrainConfig,
    add_config_args,
    add_setting_flags,
    flag_overrides,
    recipe_layers,
    resolve,
    settings,
    to_dict,
    to_yaml,
)
from util.data.captions import CaptionStore, build_caption_store, caption_recipe
from util.data.datasets import DataOrder, build_dataset, builtin_eval, builtin_eval_of
from util.data.image_folders import CaptionOrigin
from util.data.latent_cache import CachedLatentDataset, CachedLatentInput
from util.errors import UserError
from util.evaluation.evaluate import EvalOptions, eval_options, evaluate, log_unseen
from util.pretrained import build_generator, load_pretrained
from util.runtime import DistEnv, init_runtime, resolve_precision, setup_logging, shutdown_runtime, user_errors
from util.training.checkpoint import CheckpointPolicy, TrainingCheckpoint, TrainState
from util.training.loggers import RunLogger, parse_log_with
from util.training.parallel import Parallel
from util.training.preflight import check_shared_folder, checkpoint_bytes, preflight, resume_auto
from util.training.schedules import Schedules

log = logging.getLogger("jepat")


# ==================================================================== arguments
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "JEPA-T training",
        description="Every flag sets one setting of the configuration "
        "tree (util/config.py); --help shows its default, configs/*.yaml the recipes' values.",
    )
    add_config_args(p)
    add_setting_flags(p, [path for path in settings() if not path.startswith("cache.")])
    return p


@dataclass
class Launch:
    """What one command asks for: the resolved tree, and the settings its command line gave."""

    config: TrainConfig
    given: dict[str, Any]  # by dotted path: flags and overrides (not the recipes' values)


def parse_args(argv: list[str] | None = None) -> Launch:
    """Flags and overrides over the recipes, resolved."""
    return resolve_args(get_args_parser().parse_args(argv))


def resolve_args(ns: argparse.Namespace) -> Launch:
    recipes = ns.config or [DEFAULT_RECIPE]
    given = flag_overrides(ns)
    config = resolve(recipes, given, ns.overrides)
    # what the command asked for beyond the defaults: the sampling settings of the --config files
    # it names (--evaluate samples with the checkpoint's own unless asked) and the dotted overrides
    asked = [
        f"sampling.{k}" for r in ns.config or [] for _, layer in recipe_layers(r) for k in layer.get("sampling", {})
    ]
    for path in asked + [item.split("=", 1)[0] for item in ns.overrides]:
        section, name = path.split(".", 1)
        given[path] = getattr(getattr(config, section), name)  # the resolved value: flags, then overrides
    try:
        parse_log_with(config.runtime.log_with)  # an unknown logger is an error now, not after training
    except ValueError as e:
        raise ConfigError(str(e)) from None
    rt = config.runtime
    if rt.output_dir is None and rt.evaluate and rt.resume:  # beside the checkpoint, never over a run
        rt.output_dir = str(Path(rt.resume).parent / f"eval-{Path(rt.resume).stem}")
    elif rt.output_dir is None:
        rt.output_dir = "output/" + "+".join(Path(r).stem for r in recipes)
    return Launch(config, given)


# ==================================================================== the run, built once
def make_model(m: ModelConfig, tokenizer: Tokenizer, text_info: dict) -> JEPAT:
    """The preset's network with the ``model`` settings that ``JEPATConfig`` shares (same names,
    no hand mapping), and the token and caption widths the tokenizer and text encoder give."""
    grid = m.img_size // tokenizer.stride // m.patch_size
    shared = {f.name for f in fields(JEPATConfig)} & {f.name for f in fields(m)} - {"preset"}
    kw = {name: getattr(m, name) for name in shared if getattr(m, name) is not None or name != "buffer_size"}
    kw.update(token_dim=tokenizer.channels * m.patch_size**2, seq_len=grid * grid)
    kw.update(text_token_dim=text_info["token_dim"], text_pooled_dim=text_info["pooled_dim"])
    return build_model(m.preset, **kw)  # buffer_size None: the preset's


def caption_recipe_of(c: TrainConfig) -> dict:
    return caption_recipe(
        c.data.dataset,
        c.cache_path if c.data.dataset == "cached" else c.data.data_path,
        c.captions.text_encoder,
        c.captions.clip_model,
        c.captions.text_encoder_path,
        c.captions.text_max_length,
    )


def open_dataset(c: TrainConfig) -> Dataset:
    """The training set, opened before any weights load, so a refused data setting or a missing
    folder ends the run at once."""
    data_path = c.cache_path if c.data.dataset == "cached" else c.data.data_path
    dataset = build_dataset(
        c.data.dataset, data_path, c.model.img_size, c.data.num_samples, c.runtime.seed, c.data.random_flip
    )
    if isinstance(dataset, CachedLatentDataset):
        dataset.check(c.model.tokenizer, c.model.img_size)  # refuses a cache of another tokenizer / resolution
    return dataset


def build_data(c: TrainConfig, env: DistEnv, dataset: Dataset, captions: CaptionStore, tokenizer: Tokenizer):
    """Data order, loader, batch -> model inputs, and how the dataset's captions were made."""
    train_tokenizer = tokenizer
    if isinstance(dataset, CachedLatentDataset):
        train_tokenizer = CachedLatentInput(tokenizer)
    if isinstance(dataset, CachedLatentDataset) and captions.table is not None:
        dataset.use_caption_table(captions.table.dir)  # the loader gathers caption embeddings
    else:
        vocabulary = dataset.caption_vocabulary()
        if len(vocabulary) <= captions.capacity:
            captions.add(vocabulary)  # every caption encoded once, before the first step
        log.info(
            "%d unique captions (%s)%s",
            len(vocabulary),
            captions.info["name"],
            ""
            if len(vocabulary) <= captions.capacity
            else f": more than the {captions.capacity} the store "
            "keeps, so they are encoded as they come; cache them with main_cache.py to read them from disk",
        )
    order = DataOrder(len(dataset), c.optim.batch_size, seed=c.runtime.seed, rank=env.rank, world_size=env.world_size)
    # torch's default collate: images stacked, captions as a list of strings (or CaptionRows from the table)
    loader = DataLoader(
        dataset,
        batch_size=c.optim.batch_size,
        sampler=order,
        num_workers=c.data.num_workers,
        persistent_workers=c.data.num_workers > 0,  # not re-forked every epoch (400+ times)
        drop_last=True,
        pin_memory=env.device.type == "cuda",
        generator=torch.Generator().manual_seed(c.runtime.seed),
    )  # keeps the global RNG untouched
    inputs = ModelInputs(train_tokenizer, captions, c.model.patch_size, env.device)
    return order, loader, inputs, dataset.caption_origin()


def plan_evaluation(
    c: TrainConfig, env: DistEnv, origin: CaptionOrigin, captions: CaptionStore, model: JEPAT
) -> EvalOptions:
    """The evaluation after training (by default the training prompts), with everything it will
    need checked now: weights, references, prompt encodings, the output folder and its free disk."""
    options = eval_options(c.eval, c.runtime.seed, CaptionOrigin() if c.eval.skip else origin, captions.sample_captions)
    will_generate = not c.eval.skip and options.prompts is not None
    if will_generate:
        log_unseen(options.prompts, captions.known)
        captions.require(options.prompts.prompts)
    preflight(
        Path(c.runtime.output_dir),
        checkpoint_bytes(model),
        options if will_generate else None,
        checkpoint_policy(c).peak_files(c.optim.epochs),
    )
    return options


def checkpoint_policy(c: TrainConfig) -> CheckpointPolicy:
    return CheckpointPolicy(c.runtime.save_freq, c.runtime.keep_last, c.runtime.milestone_every)


def build_run(c: TrainConfig, env: DistEnv) -> Run:
    """Dataset and resumed checkpoint (checked first), tokenizer, caption store, model, EMA, data
    loader, parallel wrapper, optimizer, schedules and the checkpoint writer, with the state of
    ``runtime.resume`` restored and the later evaluation preflighted."""
    device, out_dir, o, rt = env.device, Path(c.runtime.output_dir), c.optim, c.runtime
    sharded = (
        rt.strategy == "fsdp" and env.world_size > 1
        if rt.checkpoint_format == "auto"
        else rt.checkpoint_format == "sharded"
    )
    if sharded and rt.strategy != "fsdp":
        raise UserError("runtime.checkpoint_format sharded needs runtime.strategy fsdp (DDP ranks hold whole copies)")
    dataset = open_dataset(c)  # draws nothing from the global RNG
    sharded_later = rt.strategy == "fsdp"
    ckpt = (  # another preset or global batch is refused here, before any weights are built
        TrainingCheckpoint.read(rt.resume, c.model.preset, env.world_size, o.batch_size, o.accum_iter, sharded_later)
        if rt.resume
        else None
    )
    torch.manual_seed(rt.seed)  # the same initial weights on every rank
    tokenizer = build_tokenizer(c.model.tokenizer, c.model.vae_path).to(device)  # a missing VAE file stops here
    captions = build_caption_store(caption_recipe_of(c), device)
    model = make_model(c.model, tokenizer, captions.info).to(device)
    ema = copy.deepcopy(model).requires_grad_(False).eval()  # targets and samples without dropout
    log.info("model %s: %s", c.model.preset, json.dumps(model.num_params()))
    order, loader, inputs, origin = build_data(c, env, dataset, captions, tokenizer)
    options = plan_evaluation(c, env, origin, captions, model)
    if ckpt is not None:
        TrainingCheckpoint.load_weights(ckpt, rt.resume, model, ema)
    steps_per_epoch = order.num_batches // o.accum_iter  # optimizer steps
    if steps_per_epoch < 1:
        raise UserError(f"optim.accum_iter {o.accum_iter} exceeds the {order.num_batches} batches of an epoch")
    total_steps = steps_per_epoch * o.epochs  # the schedules' length; runtime.max_steps only stops early
    global_batch = o.batch_size * env.world_size * o.accum_iter
    lr = o.lr if o.lr is not None else o.blr * global_batch / 256
    compile_backend = rt.compile_backend if rt.compile else None
    parallel = Parallel(env, model, ema, c.loss, rt.strategy, rt.precision, rt.grad_checkpointing, compile_backend)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(
        param_groups(model), lr, tuple(o.adamw_betas), o.adamw_eps, o.weight_decay, fused=fused
    )
    state = TrainState()
    state.host_generator.manual_seed(rt.seed)
    record = {"model_config": config_dict(model), "config": to_dict(c)}
    record["captions_info"] = {**captions.info, "source": origin.to_dict()}
    policy = checkpoint_policy(c)
    checkpoint = TrainingCheckpoint(
        out_dir, parallel, optimizer, state, record, policy, o.batch_size, o.accum_iter, sharded
    )
    if ckpt is not None:
        checkpoint.restore(ckpt)
        log.info("resumed %s at epoch %d, batch %d, step %d", rt.resume, state.epoch, state.batch_in_epoch, state.step)
    backend = torch.distributed.get_backend() if env.initialized else "none"
    log.info(
        "%d process(es) x batch %d x accum %d = global batch %d, lr %.3g, strategy %s (backend %s), AdamW fused=%s",
        env.world_size, o.batch_size, o.accum_iter, global_batch, lr, parallel.strategy, backend, fused,
    )  # fmt: skip
    if env.is_main:
        (out_dir / "config.yaml").write_text(to_yaml(c))
        derived = {"recipe": c.recipe, "resolved_lr": lr, "total_steps": total_steps, "world_size": env.world_size}
        derived.update(steps_per_epoch=steps_per_epoch, global_batch=global_batch, model_config=config_dict(model))
        (out_dir / "run.json").write_text(json.dumps(derived, indent=2))
    schedules = Schedules.build(o, lr, steps_per_epoch, total_steps)
    parts = (tokenizer, captions, model, ema, parallel, optimizer, schedules, loader, order, inputs, state, checkpoint)
    run = Run(c, env, out_dir, *parts, options, builtin_eval_of(origin), steps_per_epoch)
    run.history = earlier_history(run)
    return run


def earlier_history(run: Run) -> list[dict]:
    """The rows of train_log.json up to the resumed step, so a resumed run's log and curves go on."""
    path = run.out_dir / "train_log.json"
    if not run.config.runtime.resume or not run.env.is_main or not path.is_file():
        return []
    return [r for r in json.loads(path.read_text()) if r.get("step", 0) <= run.state.step]


# ==================================================================== evaluation of a saved checkpoint
def training_captions(captions: CaptionStore, recipe: dict, origin: CaptionOrigin) -> Callable[[int], list[str]] | None:
    """Up to n training captions of a caption-data checkpoint, spread over all of them: from the
    cache's caption table, or from the dataset's listing."""
    if origin.kind != "caption":
        return None
    if captions.table is not None:
        return captions.sample_captions
    vocabulary = build_dataset(recipe["dataset"], recipe["data_path"]).caption_vocabulary()
    return lambda n: vocabulary[:: max(1, len(vocabulary) // n)][:n]


def evaluate_checkpoint(launch: Launch, env: DistEnv) -> dict:
    """``--evaluate --resume CKPT_OR_FOLDER``: a checkpoint or model folder rebuilds its own model,
    caption store and tokenizer from its stored configuration; it is evaluated on its training
    prompts unless evaluation settings say otherwise, with its own sampling settings unless the
    command line gives another value."""
    c = launch.config
    if not c.runtime.resume:
        raise UserError("--evaluate needs --resume CHECKPOINT (a checkpoint-*.pth or a model folder)")
    pretrained = load_pretrained(c.runtime.resume)
    sampling = {path.split(".", 1)[1]: v for path, v in launch.given.items() if path.startswith("sampling.")}
    overrides = {
        k: v for k, v in (("text_encoder_path", c.captions.text_encoder_path), ("data_path", c.data.data_path)) if v
    }
    gen = build_generator(
        pretrained, env.device, c.runtime.precision, sampling, overrides, c.model.vae_path, use_text_cache=True
    )
    recipe = {**pretrained.recipe["captions"], **overrides}
    origin = CaptionOrigin.from_dict(
        recipe.get("source")
        or {"kind": builtin_eval(recipe["dataset"], recipe["data_path"]) or ""}  # format-1 checkpoints lack it
    )
    options = eval_options(c.eval, c.runtime.seed, origin, training_captions(gen.captions, recipe, origin))
    if options.prompts is not None:
        if origin.class_prompts:  # the training captions are known: class prompts, or a cache's table
            trained = set(origin.class_prompts)
            log_unseen(options.prompts, lambda ps: [p in trained for p in ps])
        elif gen.captions.table is not None:
            log_unseen(options.prompts, gen.captions.known)
        gen.captions.require(options.prompts.prompts)
    out_dir = Path(c.runtime.output_dir)
    preflight(out_dir, 0, options)
    logger = None
    if env.is_main:
        logger = RunLogger.open(parse_log_with(c.runtime.log_with), out_dir, config_record(c), c.runtime.wandb_project)
    try:
        return evaluate(
            gen,
            options,
            out_dir,
            pretrained.step,
            env,
            builtin_eval_of(origin),
            {"checkpoint": c.runtime.resume},
            logger,
        )
    finally:
        if logger is not None:
            logger.close()


def main(args: argparse.Namespace | Launch) -> dict:
    """One process, or one rank of a torchrun launch."""
    launch = args if isinstance(args, Launch) else resolve_args(args)
    c = launch.config
    env = init_runtime(c.runtime.device, c.runtime.dist_timeout_min)
    setup_logging(env)
    try:
        c.runtime.precision = resolve_precision(env.device, c.runtime.precision)
        log.info("device %s, precision %s, recipe %s", env.device, c.runtime.precision, c.recipe)
        if c.runtime.evaluate:
            return evaluate_checkpoint(launch, env)
        check_shared_folder(Path(c.runtime.output_dir), env)
        if c.runtime.resume == "auto":  # decided once, by rank 0, for every node
            c.runtime.resume = resume_auto(Path(c.runtime.output_dir), env)
        return train(build_run(c, env))
    finally:
        shutdown_runtime(env)


if __name__ == "__main__":
    with user_errors():
        main(get_args_parser().parse_args())
