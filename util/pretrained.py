"""A trained model as others get it: a training checkpoint, or a Hugging Face-style folder
(``model.safetensors`` with the EMA weights, ``config.json``, a ``README.md`` model card and the
run's ``metrics.json``) written by ``main_sample.py --export_dir`` and pushed with ``hf upload``.

``load_pretrained`` reads either and ``build_generator`` makes the sampler of it: the one path of
``main_sample.py``, ``main_jepat.py --evaluate`` and ``app.py``. Nothing read here can run code:
weights come from safetensors or a ``weights_only`` checkpoint, the rest is JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from models.jepat import JEPAT, JEPATConfig
from models.safe_load import CheckpointFileError
from models.sampler import SamplingConfig
from models.tokenizers import build_tokenizer
from util.config import ConfigError, from_flat_args, to_dict
from util.data.captions import build_caption_store, check_widths
from util.evaluation.generate import ImageGenerator
from util.training.checkpoint import checkpoint_recipe, load_checkpoint, training_summary
from util.training.sharded import is_sharded

log = logging.getLogger(__name__)

WEIGHTS, CONFIG, CARD, METRICS = "model.safetensors", "config.json", "README.md", "metrics.json"
FOLDER_FORMAT, FOLDER_VERSION = "jepat-pretrained", 2  # 2: the configuration tree


@dataclass
class Pretrained:
    """What sampling and evaluation need of a trained model."""

    model_config: dict[str, Any]  # JEPATConfig fields
    weights: dict[str, torch.Tensor]  # the EMA weights (the raw ones with ``raw=True``)
    recipe: dict[str, dict[str, Any]]  # "sampling", "captions", "image" (checkpoint_recipe)
    step: int  # optimizer steps the weights were trained for
    source: Path
    training: dict[str, Any] = field(default_factory=dict)  # recipe, epochs, batch, lr, train_seconds
    metrics: dict[str, Any] | None = None  # the run's metrics.json at this step, if any
    config: dict[str, Any] | None = None  # the run's configuration tree (None: written before it existed)
    captions_info: dict[str, Any] = field(default_factory=dict)  # encoder widths, how the captions were made

    def build_model(self, device: torch.device | str) -> JEPAT:
        """The network with these weights, frozen, in eval mode, on ``device``."""
        model = JEPAT(JEPATConfig(**self.model_config))
        try:
            model.load_state_dict(self.weights)
        except RuntimeError as e:
            raise CheckpointFileError(
                f"the weights of {self.source} do not fit its model config: {str(e).splitlines()[0]}"
            ) from None
        return model.to(device).requires_grad_(False).eval()


def load_pretrained(path: str | os.PathLike, raw: bool = False) -> Pretrained:
    """A model folder (``config.json`` + ``model.safetensors``), a ``checkpoint-*.pth`` file or a sharded
    ``checkpoint-*.dcp`` folder; ``raw``: a checkpoint's raw weights instead of its EMA (a model
    folder holds the EMA only)."""
    path = Path(path)
    if path.is_dir() and not is_sharded(path):
        if raw:
            raise CheckpointFileError(
                f"{path} is a model folder: it holds the EMA weights only; --raw needs a "
                "training checkpoint (checkpoint-*.pth)"
            )
        return _load_folder(path)
    ckpt = load_checkpoint(path)
    step = int(ckpt.get("state", {}).get("step", 0))
    return Pretrained(
        ckpt["model_config"],
        ckpt["model" if raw else "ema"],
        checkpoint_recipe(ckpt),
        step,
        path,
        training_summary(ckpt),
        _run_metrics(path.parent / METRICS, step),
        ckpt.get("config") or _tree_of_launch_arguments(ckpt, path),
        ckpt.get("captions_info", {}),
    )


def _tree_of_launch_arguments(ckpt: dict[str, Any], path: Path) -> dict[str, Any] | None:
    """A checkpoint written before the configuration tree (formats 1 to 3): its tree rebuilt from
    the flat launch arguments it kept, or None (with the reason logged) when they do not convert."""
    if not ckpt.get("args"):
        return None
    try:
        return to_dict(from_flat_args(ckpt["args"]))
    except ConfigError as e:
        log.info("%s predates the configuration tree and its launch arguments do not convert (%s)", path, e)
        return None


def _run_metrics(path: Path, step: int) -> dict[str, Any] | None:
    """The run's ``metrics.json`` when it was measured on the weights of ``step``."""
    if not path.is_file():
        return None
    metrics = json.loads(path.read_text())
    if metrics.get("step") != step:
        log.info("%s is of step %s, the weights of step %d: not attached", path, metrics.get("step"), step)
        return None
    return metrics


def _load_folder(folder: Path) -> Pretrained:
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    expected = f"expected {CONFIG} and {WEIGHTS} as main_sample.py --export_dir writes them"
    for p in (config_path, weights_path):
        if not p.is_file():
            raise CheckpointFileError(f"{folder} is not a JEPA-T model folder: no {p.name}; {expected}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointFileError(f"{config_path} is not valid JSON ({e}); {expected}") from None
    if not isinstance(config, dict) or config.get("format") != FOLDER_FORMAT:
        raise CheckpointFileError(
            f'{config_path} is not the config of a JEPA-T model (no "format": "{FOLDER_FORMAT}"); {expected}'
        )
    if config.get("format_version", 0) > FOLDER_VERSION:
        raise CheckpointFileError(
            f"{config_path} has format version {config['format_version']}; this code reads "
            f"up to {FOLDER_VERSION}: update the code"
        )
    try:
        weights = load_file(weights_path)
    except (SafetensorError, OSError) as e:
        raise CheckpointFileError(
            f"{weights_path} is not a readable safetensors file ({weights_path.stat().st_size} bytes): {e}"
        ) from None
    metrics_path = folder / METRICS
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    return Pretrained(
        config["model_config"],
        weights,
        checkpoint_recipe(config),
        int(config.get("step", 0)),
        folder,
        config.get("training", {}),
        metrics,
        config.get("config"),
        config.get("captions_info", {}),
    )


def export_pretrained(pre: Pretrained, out_dir: str | os.PathLike) -> Path:
    """Write ``model.safetensors``, ``config.json``, ``README.md`` (and ``metrics.json``) to ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in pre.weights.items()}
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", "weights": "ema", "step": str(pre.step)})
    stored = {"config": pre.config, "captions_info": pre.captions_info} if pre.config is not None else pre.recipe
    config = {
        "format": FOLDER_FORMAT,
        "format_version": FOLDER_VERSION,
        "model_config": pre.model_config,
        **stored,
        "step": pre.step,
        "training": pre.training,
    }
    (out / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if pre.metrics is not None:
        (out / METRICS).write_text(json.dumps(pre.metrics, indent=2) + "\n")
    (out / CARD).write_text(model_card(pre))
    log.info("wrote %s, %s and %s (%d tensors) to %s", WEIGHTS, CONFIG, CARD, len(tensors), out)
    return out


def _metric_lines(metrics: dict[str, Any] | None) -> list[str]:
    """The headline figures of a metrics.json as Markdown table rows."""
    if not metrics:
        return ["No evaluation was attached (the run's metrics.json was absent or of another step)."]
    rows = []
    for split in ("seen", "heldout", "heldout_words"):
        if split in metrics:
            m = metrics[split]
            what = "seen combinations in held-out words" if split == "heldout_words" else f"{split} combinations"
            rows.append(
                f"| shapes, {what} ({m['n']} images) | color {m['color_acc']:.3f}, "
                f"shape {m['shape_acc']:.3f}, both {m['joint_acc']:.3f} |"
            )
    for split in ("pairs_seen", "pairs_heldout"):
        if split in metrics:
            m = metrics[split]
            rows.append(
                f"| pairs, {split.removeprefix('pairs_')} bindings ({m['n']} images) | objects "
                f"{m['objects_acc']:.3f}, relation {m['relation_acc']:.3f}, both {m['joint_acc']:.3f} |"
            )
    fidelity = metrics.get("fidelity", {})
    if "fid" in fidelity:
        rows.append(f"| {fidelity['fid_label']} | {fidelity['fid']:.2f} |")
    for key in ("inception_score_mean", "precision", "recall"):
        if key in fidelity:
            rows.append(f"| {key.replace('_', ' ')} | {fidelity[key]:.3f} |")
    if "clip_score" in metrics.get("clip_score", {}):
        rows.append(f"| CLIP score | {metrics['clip_score']['clip_score']:.3f} |")
    return ["| metric | value |", "|---|---|"] + rows if rows else ["(metrics.json holds no headline figure)"]


def model_card(pre: Pretrained) -> str:
    """The folder's README.md: what the model is, its data, steps, metrics and how to use it."""
    c, cap, img, s = pre.model_config, pre.recipe["captions"], pre.recipe["image"], pre.recipe["sampling"]
    where = f"at `{cap['data_path']}`" if cap.get("data_path") else ""
    t = pre.training
    hours = f", {t['train_seconds'] / 3600:.2f} h of training" if t.get("train_seconds") else ""
    lines = [
        "---",
        "library_name: jepat",
        "pipeline_tag: text-to-image",
        "tags: [jepa, masked-generation, flow-matching]",
        "---",
        "",
        f"# JEPA-T, {c.get('preset') or 'custom'} preset, step {pre.step}",
        "",
        "A text-conditioned JEPA-T (arXiv 2510.00974): a masked JEPA transformer with text fusion and a per-token "
        "flow-matching head, sampled by MAR-style iterative unmasking. `model.safetensors` holds the EMA weights; "
        "`config.json` rebuilds the model, its text encoder and tokenizer, and holds the sampling defaults.",
        "",
        "## Data and training",
        "",
        f"* data: `{cap.get('dataset')}` {where}".rstrip(),
        f"* captions embedded by `{cap.get('text_encoder')}` ({cap.get('token_dim')}-wide tokens, pooled "
        f"{cap.get('pooled_dim')}, max length {cap.get('text_max_length') or 'default'})",
        f"* images: {img.get('img_size')} px through the `{img.get('tokenizer')}` tokenizer, "
        f"patch {img.get('patch_size')}"
        f" ({c.get('seq_len')} tokens of width {c.get('token_dim')})",
        f"* {pre.step} optimizer steps{hours}; recipe `{t.get('recipe', '?')}`, batch {t.get('batch_size', '?')} "
        f"per process, " + (f"lr {t['lr']}" if t.get("lr") else f"base lr {t.get('blr', '?')} per 256 images"),
        f"* sampling defaults: {s.get('num_iter')} iterations, guidance {s.get('guidance_scale')} "
        f"({s.get('guidance_schedule')}), temperature {s.get('temperature')}, {s.get('ode_steps')} "
        f"{s.get('ode_solver')} ODE steps",
        "",
        "## Metrics",
        "",
        *_metric_lines(pre.metrics),
        "",
        "## Use",
        "",
        "```bash",
        "hf download USER/REPO --local-dir jepat-model        # or any copy of this folder",
        'python main_sample.py --checkpoint jepat-model --prompt "a red circle" --out_dir samples',
        "python app.py --checkpoint jepat-model               # the browser demo on localhost",
        "```",
        "",
        "The code is the JEPA-T training framework that wrote this folder. Loading reads safetensors and JSON "
        "only: nothing in the folder is executed.",
        "",
    ]
    return "\n".join(lines)


def build_generator(
    pre: Pretrained,
    device: torch.device,
    precision: str,
    sampling_overrides: dict[str, Any] | None = None,
    captions_overrides: dict[str, Any] | None = None,
    vae_path: str | None = None,
    use_text_cache: bool = False,
) -> ImageGenerator:
    """Model, caption store, tokenizer and sampler settings of ``pre`` as an :class:`ImageGenerator`.

    ``sampling_overrides`` replace the stored sampling defaults; ``captions_overrides`` parts of the
    caption recipe (``text_encoder_path``, ``data_path``); ``use_text_cache``: read the caption
    embeddings of a latent cache when it has them (evaluation), else build the text encoder (free prompts).
    """
    model = pre.build_model(device)
    captions_recipe = {**pre.recipe["captions"], **(captions_overrides or {})}
    captions = build_caption_store(captions_recipe, device, use_cache=use_text_cache)
    check_widths(captions, model.cfg.text_token_dim, model.cfg.text_pooled_dim, str(pre.source))
    image = pre.recipe["image"]
    tokenizer = build_tokenizer(image["tokenizer"], vae_path or image.get("vae_path")).to(device)
    sampling = SamplingConfig(**{**pre.recipe["sampling"], **(sampling_overrides or {})})
    return ImageGenerator(model, captions, tokenizer, sampling, device, precision)
