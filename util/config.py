"""The run's configuration: one typed tree of dataclasses, the only place a default lives.

    TrainConfig
      model     ModelConfig      the preset, image tokens, masking, where the text enters
      loss      JEPATLoss        (models/loss.py: the loss is its own configuration)
      captions  CaptionConfig    the frozen text encoder
      data      DataConfig       what is read, and how
      optim     OptimConfig      AdamW, schedules, EMA, batch
      sampling  SamplingConfig   (models/sampler.py) unmasking, guidance, flow ODE
      eval      EvalConfig       what the evaluation generates and measures
      runtime   RuntimeConfig    device, precision, strategy, checkpoints, logging
      cache     CacheConfig      main_cache.py: where the images come from and how they are stored

The defaults are the published JEPA-T code and launch script of the base model (docs/recipes.md
lists every setting against the published one). A recipe is a small YAML file of overrides in
``configs/``; a user copies one to start an experiment. Resolution, later wins:

    dataclass defaults <- recipe files (--config NAME_OR_FILE, repeatable; a file may say
    ``base: NAME``) <- flags (--name or --section.name) <- positional overrides ``section.name=value``

OmegaConf merges the layers and checks every value against the field's type (a string where a
number belongs fails naming the key and the file); the flags are generated here from the same
fields, with their help, by argparse. The resolved tree goes to ``config.yaml`` in the run folder
and into every checkpoint, and ``main_sample.py``, ``--evaluate``, model folders and ``app.py``
rebuild from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from models.jepat import FUSION_MODES, JEPAT_MODELS, JEPATConfig
from models.loss import JEPATLoss
from models.sampler import SamplingConfig
from models.settings import setting
from models.text_encoders import TEXT_ENCODERS
from models.tokenizers import TOKENIZERS
from util.data.image_folders import DEFAULT_PROMPT
from util.errors import UserError
from util.evaluation.fid import INCEPTION
from util.runtime import PRECISIONS

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
DEFAULT_RECIPE = "shapes"
STRATEGIES = ("ddp", "fsdp")
CHECKPOINT_FORMATS = ("auto", "plain", "sharded")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DATASETS = ("shapes", "pairs", "imagenet", "captions", "webdataset", "cached")


class ConfigError(UserError, ValueError):
    """A setting that cannot be resolved: unknown key, wrong type, value outside its choices, missing file."""


# ==================================================================== the tree
@dataclass
class ModelConfig:
    """The network and its image tokens. Architecture widths and depths come from the preset."""

    preset: str = setting(
        "base", "model preset (models/jepat.py JEPAT_MODELS)", choices=sorted(JEPAT_MODELS), flag="model"
    )
    img_size: int = setting(256, "image side in pixels")
    patch_size: int = setting(1, "latent patch size (tokens = (img_size / stride / patch)^2)")
    tokenizer: str = setting("kl16", "frozen image tokenizer", choices=sorted(TOKENIZERS))
    vae_path: str | None = setting(None, "kl16: kl16.ckpt file; sd-vae: a diffusers folder")
    buffer_size: int | None = setting(None, "buffer tokens carrying the pooled condition (none: the preset's)")
    mask_ratio_min: float = setting(JEPATConfig.mask_ratio_min, "lower end of the mask ratio's truncated normal")
    mask_ratio_std: float = setting(JEPATConfig.mask_ratio_std, "std of the mask ratio's truncated normal (mean 1)")
    cond_drop_prob: float = setting(JEPATConfig.cond_drop_prob, "probability of the null condition (CFG dropout)")
    diffusion_batch_mul: int = setting(JEPATConfig.diffusion_batch_mul, "flow draws per masked token")
    qk_norm: bool = setting(JEPATConfig.qk_norm, "LayerNorm on queries and keys")
    t_logit_mean: float | None = setting(
        JEPATConfig.t_logit_mean, "flow times t ~ sigmoid(N(mean, std)); none: uniform t"
    )
    t_logit_std: float = setting(JEPATConfig.t_logit_std, "std of the logit-normal flow times")
    flow_prediction: str = setting(
        JEPATConfig.flow_prediction, "the head outputs the velocity (v) or the clean token (x)", choices=("v", "x")
    )
    fusion: str = setting(
        JEPATConfig.fusion,
        "where the text enters (full: the published code; late_only: the paper's task-agnostic backbone)",
        choices=FUSION_MODES,
    )


@dataclass
class CaptionConfig:
    """The frozen text encoder (never part of the trained model or its checkpoint)."""

    text_encoder: str = setting("clip", "frozen text encoder", choices=sorted(TEXT_ENCODERS))
    clip_model: str = setting("ViT-B-32", "open_clip architecture of the clip text encoder")
    text_max_length: int = setting(0, "caption tokens (0: the encoder's own default, 77 for CLIP)")
    text_encoder_path: str | None = setting(
        None,
        "clip: a local open_clip checkpoint file or pretrained tag; "
        "minilm: a model folder (default: the packaged weights)",
    )


@dataclass
class DataConfig:
    """What trains the model. ``cached``: a main_cache.py folder (``data_path``, else ``cache.cache_dir``)."""

    dataset: str = setting(
        "cached",
        "shapes: built in, one object; pairs: built in, two objects in a relation; imagenet: class folders; "
        "captions: a JSON Lines manifest; webdataset: tar shards; cached: a main_cache.py folder",
        choices=DATASETS,
    )
    data_path: str = setting("", "the dataset's folder, manifest, shard pattern or cache folder")
    num_samples: int = setting(0, "shapes, pairs: images per epoch")
    num_workers: int = setting(10, "loader processes per rank")
    random_flip: bool | None = setting(
        None,
        "random horizontal flips (default: on for class folders, off for "
        "captions; from a cache only if it holds flipped moments)",
    )


@dataclass
class OptimConfig:
    """AdamW, the schedules (pure functions of the step) and the EMA."""

    batch_size: int = setting(32, "per process (global batch = batch_size x processes x accum_iter)")
    accum_iter: int = setting(1, "micro-batches per optimizer step")
    epochs: int = setting(1400, "epochs the schedules span")
    lr: float | None = setting(None, "absolute lr (none: blr x global batch / 256)")
    blr: float = setting(1e-4, "base lr per 256 images")
    min_lr: float = setting(0.0, "final lr of the cosine schedule")
    lr_schedule: str = setting("constant", "after warmup", choices=("constant", "cosine"))
    warmup_epochs: float = setting(100.0, "linear lr warmup")
    weight_decay: float = setting(0.02, "AdamW weight decay on matrices")
    weight_decay_end: float | None = setting(None, "cosine weight-decay schedule end (none: constant)")
    adamw_betas: tuple[float, float] = setting((0.9, 0.95), "AdamW betas")
    adamw_eps: float = setting(1e-6, "AdamW epsilon")
    grad_clip: float = setting(3.0, "max gradient norm (<= 0: none, still measured)")
    ema_rate: float = setting(0.9999, "final EMA momentum")
    ema_rate_start: float | None = setting(None, "initial EMA momentum, cosine towards ema_rate (none: constant)")


@dataclass
class EvalConfig:
    """The evaluation after training (and every ``freq`` epochs): prompts, metrics, references."""

    skip: bool = setting(False, "skip the evaluation after training", flag="no_eval")
    freq: int = setting(0, "also evaluate every N epochs during training (0: only at the end)", flag="eval_freq")
    class_names: str | None = setting(
        None,
        "class names, one per line, plain or 'wnid<TAB>name': class-balanced "
        "prompts (default for class folders: exactly its class prompts)",
        flag="eval_class_names",
    )
    class_template: str | None = setting(
        None, "prompt of a class name, e.g. 'a photo of a {}' (default: the training one)", flag="eval_class_template"
    )
    prompts_file: str | None = setting(None, "text file, one free-text prompt per line", flag="eval_prompts_file")
    num_images: int | None = setting(
        None, "images to generate (default: 50000 for class names, one per prompt for a prompts file)"
    )
    batch_size: int = setting(256, "generation and feature batch per rank", flag="eval_batch_size")
    per_combo: int = setting(
        16, "shapes: images per color-shape combination; pairs: images per pair of objects", flag="eval_per_combo"
    )
    fid_ref: str | None = setting(None, "FID reference: statistics .npz (e.g. ADM's) or an image folder")
    metrics: str = setting("fid,isc,prc", "comma-separated subset of fid,isc,prc,kid", flag="eval_metrics")
    feature_extractor: str = setting(INCEPTION, "a torch-fidelity feature extractor", flag="fid_feature_extractor")
    inception_weights: str | None = setting(None, "default: torch-fidelity's file in the torch.hub cache")
    save_npz: bool = setting(False, "also write the samples as an ADM-suite .npz (arr_0, arr_1)")
    save_samples: bool = setting(
        True, "write every generated evaluation image as a PNG (the metrics are computed in memory)"
    )
    clip_score_model: str = setting("ViT-B-32", "open_clip model of the CLIP score")
    clip_score_weights: str | None = setting(
        None, "open_clip checkpoint file or cached pretrained tag; without it the CLIP score is skipped"
    )
    probe: bool = setting(False, "shapes: linear probe of the frozen encoder (color, shape)")
    probe_train: int = setting(1000, "probe training images")
    probe_test: int = setting(500, "probe test images")


@dataclass
class RuntimeConfig:
    """How this run executes and what it writes; none of it changes what the model learns."""

    device: str = setting("auto", "auto, cpu, cuda, cuda:1, ...")
    precision: str = setting(
        "auto", "auto: bf16 on GPUs that have it and on CPUs that run it faster, else fp32", choices=PRECISIONS
    )
    seed: int = setting(0, "initial weights, data order and every training draw")
    output_dir: str | None = setting(
        None, "run folder (default: output/<recipe>; with --evaluate: eval-<checkpoint name> beside the checkpoint)"
    )
    resume: str = setting(
        "",
        "checkpoint to resume from (model, EMA, optimizer, position); auto: the run folder's "
        "checkpoint-last.pth if rank 0 sees one, else a fresh start",
    )
    evaluate: bool = setting(False, "only evaluate the --resume checkpoint or model folder")
    strategy: str = setting(
        "ddp", "under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard)", choices=STRATEGIES
    )
    grad_checkpointing: bool = setting(True, "recompute encoder and predictor blocks in the backward pass")
    compile: bool = setting(True, "torch.compile the training step")
    compile_backend: str = setting("inductor", "torch.compile backend", choices=COMPILE_BACKENDS)
    dist_timeout_min: float = setting(30.0, "collective timeout (checkpoint gathers and evaluation on rank 0)")
    save_freq: int = setting(10, "write checkpoint-<epoch>.pth every N epochs (0: none); checkpoint-last.pth always")
    keep_last: int = setting(2, "newest epoch checkpoints kept; older ones are removed unless milestones (0: keep all)")
    milestone_every: int = setting(100, "epoch checkpoints at multiples of N epochs are never removed (0: none)")
    checkpoint_format: str = setting(
        "auto",
        "plain: one checkpoint-<tag>.pth gathered on rank 0; sharded: checkpoint-<tag>.dcp folders every "
        "rank writes its shards to (FSDP only; python -m util.training.checkpoint --convert makes a file of "
        "one); auto: sharded under FSDP with more than one rank",
        choices=CHECKPOINT_FORMATS,
    )
    save_every_steps: int = setting(1000, "also refresh checkpoint-last.pth every N steps (0: at epoch ends)")
    log_freq: int = setting(100, "optimizer steps between loss read-backs and log lines")
    max_steps: int | None = setting(None, "stop after this many optimizer steps (the schedules still span epochs)")
    grid_freq: int = setting(10, "epochs between logged sample grids (0: none)")
    log_with: str = setting(
        "tensorboard", "comma list of tensorboard, wandb (or none): where scalars, grids and evaluation figures go"
    )
    wandb_project: str = setting("jepat", "W&B project (entity and mode: WANDB_ENTITY, WANDB_MODE)")


@dataclass
class CacheConfig:
    """main_cache.py: the images to encode and how the cache is written (``data.data_path`` of a
    training run on ``dataset: cached`` defaults to ``cache_dir``)."""

    dataset: str = setting(
        "imagenet",
        "imagenet: class folders; captions: a JSON Lines manifest; webdataset: tar shards; shapes, pairs: the "
        "built-in sets",
        choices=("imagenet", "captions", "webdataset", "shapes", "pairs"),
    )
    data_path: str = setting(
        "",
        "imagenet: the folder with train/<synset>/...; captions: the image root (or the "
        "manifest); webdataset: a brace pattern of tar shards or a folder of .tar files",
    )
    cache_dir: str = setting("", "where the cache is written")
    manifest: str | None = setting(None, "captions: JSON Lines manifest (paths relative to data_path)")
    prompt_template: str = setting(DEFAULT_PROMPT, "imagenet: caption of a class")
    small_images: str = setting(
        "upscale", "images whose short side is below img_size: upscale (as ADM) or skip", choices=("upscale", "skip")
    )
    shard_size: int = setting(16384, "entries per shard file")
    dtype: str = setting("float32", "stored moments", choices=("float32", "float16"))
    random_flip: bool | None = setting(
        None,
        "also store each image's horizontally flipped moments (default: on "
        "for class folders, off for captions and the built-in sets)",
    )
    batch_size: int = setting(64, "images per forward pass (x2 with flips)")
    num_workers: int = setting(4, "image decoding processes")
    max_batches: int | None = setting(None, "stop each rank after this many batches (rerun to finish)")
    text_batch_size: int = setting(1024, "captions per text-encoder batch")
    skip_text: bool = setting(False, "do not cache the caption embeddings", flag="no_text_cache")


@dataclass
class TrainConfig:
    """The whole configuration of a run (``recipe``: the files it was read from, for the record)."""

    recipe: str = DEFAULT_RECIPE
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: JEPATLoss = field(default_factory=JEPATLoss)
    captions: CaptionConfig = field(default_factory=CaptionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)

    @property
    def cache_path(self) -> str:
        """The latent cache a ``cached`` run reads: ``data.data_path``, else ``cache.cache_dir``."""
        return self.data.data_path or self.cache.cache_dir


SECTIONS: dict[str, type] = {name: tp for name, tp in typing.get_type_hints(TrainConfig).items() if name != "recipe"}


# ==================================================================== the fields
@dataclass(frozen=True)
class Setting:
    """One leaf of the tree: ``path`` is ``section.name``; ``flag`` its short command-line name."""

    path: str
    section: str
    name: str
    type: Any
    default: Any
    help: str
    choices: tuple[Any, ...] | None
    flag: str


def settings(sections: Iterable[str] | None = None) -> dict[str, Setting]:
    """Every leaf of the tree (or of ``sections``), by dotted path."""
    out: dict[str, Setting] = {}
    for section in sections or SECTIONS:
        cls = SECTIONS[section]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            meta = f.metadata
            out[f"{section}.{f.name}"] = Setting(
                f"{section}.{f.name}",
                section,
                f.name,
                hints[f.name],
                f.default,
                meta.get("help", ""),
                meta.get("choices"),
                meta.get("flag") or f.name,
            )
    return out


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _scalar_parser(tp: Any, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.strip().lower() == "none":
            return None
        try:
            return tp(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {tp.__name__}{' or none' if optional else ''}, got {text!r}"
            ) from None

    parse.__name__ = tp.__name__
    return parse


def add_setting_flags(
    parser: argparse.ArgumentParser, paths: Iterable[str], default_suppressed: bool = True, title: str | None = None
) -> None:
    """One flag per setting: ``--flag`` (the short name, unique in this parser) and ``--section.name``.
    Given flags land in the namespace as ``set:section.name`` (see :func:`flag_overrides`)."""
    table = settings()
    groups: dict[str, argparse._ArgumentGroup] = {}
    for path in paths:
        s = table[path]
        group = groups.setdefault(
            s.section, parser.add_argument_group(title or f"{s.section} ({SECTIONS[s.section].__name__})")
        )
        tp, optional = _unwrap_optional(s.type)
        names = [f"--{s.flag}"] + ([f"--{path}"] if f"--{path}" != f"--{s.flag}" else [])
        default = f"default {s.default!r}" if s.default is not dataclasses.MISSING else ""
        kw: dict[str, Any] = dict(
            dest=f"set:{path}",
            default=argparse.SUPPRESS,
            help=f"{s.help} [{default}]" if default_suppressed else s.help,
        )
        if tp is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is tuple:
            kw.update(nargs=len(typing.get_args(tp)), type=typing.get_args(tp)[0], metavar=s.name.upper())
        else:
            kw["type"] = _scalar_parser(tp, optional)
            if s.choices:
                kw["choices"] = s.choices
            else:
                kw["metavar"] = tp.__name__.upper() + ("|none" if optional else "")
        group.add_argument(*names, **kw)


def flag_overrides(ns: argparse.Namespace) -> dict[str, Any]:
    """The settings given as flags in ``ns``, by dotted path."""
    return {k[4:]: (tuple(v) if isinstance(v, list) else v) for k, v in vars(ns).items() if k.startswith("set:")}


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """``--config`` (repeatable) and positional ``section.name=value`` overrides."""
    parser.add_argument(
        "--config",
        "--recipe",
        dest="config",
        action="append",
        default=None,
        metavar="NAME_OR_FILE",
        help=f"a recipe in configs/ ({', '.join(recipe_names())}) or a YAML file of overrides; "
        f"repeat to layer several (default: {DEFAULT_RECIPE})",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="section.name=value",
        help="dotted overrides, applied last (e.g. optim.batch_size=64 sampling.guidance_scale=3)",
    )


# ==================================================================== recipes and resolution
def recipe_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def recipe_path(name_or_file: str) -> Path:
    """A recipe name (a file in configs/) or a path to a YAML file."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"no configuration file at {path}; copy one of configs/*.yaml to start an experiment")
        return path
    path = CONFIG_DIR / f"{name_or_file}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown recipe {name_or_file!r}; choose one of {recipe_names()} or pass a .yaml file")
    return path


def recipe_layers(name_or_file: str, seen: tuple[str, ...] = ()) -> list[tuple[str, dict]]:
    """The override layers of a recipe, its ``base:`` chain first: [(file, overrides), ...]."""
    path = recipe_path(name_or_file)
    if str(path) in seen:
        raise ConfigError(f"recipe {path} names itself as a base (through {' -> '.join(seen)})")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path)) or {}
    except Exception as e:  # yaml's ScannerError and friends: a malformed file, named
        raise ConfigError(f"{path} is not a readable YAML file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections to settings, got {type(data).__name__}")
    base = data.pop("base", None)
    layers = recipe_layers(base, seen + (str(path),)) if base else []
    return layers + [(str(path), data)]


def nested(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path, value in flat.items():
        section, name = path.split(".", 1)
        out.setdefault(section, {})[name] = list(value) if isinstance(value, tuple) else value
    return out


def _merge(tree, layer: dict, source: str):
    try:
        return OmegaConf.merge(tree, OmegaConf.create(layer))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", "") or ""
        raise ConfigError(f"{source}: {str(e).splitlines()[0]}" + (f" (setting {key})" if key else "")) from None


def resolve(
    recipes: Sequence[str] = (DEFAULT_RECIPE,), overrides: dict[str, Any] | None = None, dotlist: Sequence[str] = ()
) -> TrainConfig:
    """The configuration of ``recipes`` (names or files, layered in order) with ``overrides``
    (``{"optim.lr": 1e-3}``) and ``dotlist`` (``["optim.lr=1e-3"]``) on top; checked."""
    tree = OmegaConf.structured(TrainConfig)
    for recipe in recipes:
        for source, layer in recipe_layers(recipe):
            tree = _merge(tree, layer, source)
    tree = _merge(tree, nested(overrides or {}), "flags")
    for item in dotlist:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.name=value")
        try:
            layer = OmegaConf.to_container(OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override {item!r}: {str(e).splitlines()[0]}") from None
        tree = _merge(tree, layer, f"override {item!r}")
    tree.recipe = "+".join(recipes)
    return check(_to_object(tree))


def _to_object(tree) -> TrainConfig:
    try:
        return OmegaConf.to_object(tree)
    except (OmegaConfBaseException, ValueError) as e:
        raise ConfigError(str(e).splitlines()[0]) from None


def check(config: TrainConfig) -> TrainConfig:
    """Every value with a list of choices is one of them (files and stored trees are not checked by
    argparse); the dataclasses' own checks ran when the tree was built."""
    for path, s in settings().items():
        value = getattr(getattr(config, s.section), s.name)
        if s.choices and value is not None and value not in s.choices:
            raise ConfigError(f"{path} = {value!r} is not one of {list(s.choices)}")
    config.sampling.validate()
    return config


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The tree as plain data (what checkpoints, config.yaml and model folders store)."""
    return OmegaConf.to_container(OmegaConf.structured(config))


def to_yaml(config: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def from_dict(data: dict[str, Any], source: str = "stored configuration") -> TrainConfig:
    """A tree stored by :func:`to_dict` (a checkpoint's, a model folder's) rebuilt and checked;
    settings this code no longer knows are an error that names them."""
    data = dict(data)
    recipe = data.pop("recipe", DEFAULT_RECIPE)
    tree = _merge(OmegaConf.structured(TrainConfig), data, source)
    tree.recipe = recipe
    return check(_to_object(tree))


# ==================================================================== old checkpoints
# Format 1-3 checkpoints kept their launch arguments flat (``args``) under these older names.
RENAMED = {
    "model": "model.preset",
    "cfg": "sampling.guidance_scale",
    "cfg_schedule": "sampling.guidance_schedule",
    "sampler": "sampling.ode_solver",
    "no_eval": "eval.skip",
}


def from_flat_args(args: dict[str, Any]) -> TrainConfig:
    """The tree of an older checkpoint, from its flat launch arguments: each name that is a
    setting's short flag (or a renamed one) is placed; the rest (derived values) is dropped."""
    by_flag = {s.flag: path for path, s in settings(s for s in SECTIONS if s != "cache").items()}
    by_flag.update(RENAMED)
    overrides = {}
    for name, value in args.items():
        path = by_flag.get(name)
        if path is None:
            continue
        if path == "runtime.log_with" and isinstance(value, (list, tuple)):
            value = ",".join(value) or "none"
        overrides[path] = tuple(value) if isinstance(value, list) else value
    tree = _merge(OmegaConf.structured(TrainConfig), nested(overrides), "the checkpoint's launch arguments")
    tree.recipe = str(args.get("recipe", DEFAULT_RECIPE))
    return check(_to_object(tree))
