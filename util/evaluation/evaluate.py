"""Evaluation by generation, and the one writer of ``metrics.json``.

Two kinds: a prompt set (class-balanced class names or a prompts file: generated across ranks,
seeded per image id, then FID / IS / precision-recall / KID through torch-fidelity and the CLIP
score), or, for models trained on a built-in set (``shapes``, ``pairs``), its judged evaluation (rank 0).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from util.config import EvalConfig
from util.data.image_folders import CaptionOrigin
from util.errors import UserError
from util.evaluation import clip_score, fid, probe
from util.evaluation.generate import ImageGenerator, SampleFolder, image_name, image_seed, save_adm_npz, write_pngs
from util.evaluation.pairs_eval import evaluate_pairs
from util.evaluation.prompts import PromptSet, class_balanced_prompts, file_prompts, read_class_names, read_lines
from util.evaluation.shapes_eval import evaluate_shapes
from util.runtime import DistEnv

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """What to generate and what to compute from it."""

    prompts: PromptSet | None = None  # None: the dataset's own evaluation (shapes, pairs), if any
    fid_ref: str | None = None  # statistics .npz or reference image folder
    metrics: tuple[str, ...] = ("fid", "isc", "prc")
    feature_extractor: str = fid.INCEPTION
    inception_weights: str | None = None
    save_npz: bool = False
    save_samples: bool = True  # every generated image as a PNG (the metrics do not read them)
    clip_score_model: str = "ViT-B-32"
    clip_score_weights: str | None = None  # open_clip checkpoint file or pretrained tag; None: skipped
    batch_size: int = 64
    per_combo: int = 16  # shapes: images per color-shape combination; pairs: per pair of objects
    probe: bool = False  # shapes: linear probe of the frozen encoder
    probe_sizes: tuple[int, int] = (1000, 500)  # its training and test images
    seed: int = 0


def eval_prompts(
    e: EvalConfig, origin: CaptionOrigin, training_captions: Callable[[int], list[str]] | None = None
) -> PromptSet | None:
    """The prompt of every evaluation image: from ``class_names`` or ``prompts_file``, else
    the training captions: for class folders exactly the class prompts, class-balanced (50,000
    images unless --num_images); for caption data up to 30,000 of its captions, spread over all of
    them (``training_captions(n)``), one image each. ``source``: how the training captions were made."""
    if e.class_names and e.prompts_file:
        raise UserError("give --eval_class_names or --eval_prompts_file, not both")

    def num(classes: int) -> int:  # 50 per class for ImageNet's 1000 (FID-50K), ~50,000 in all otherwise
        return e.num_images or max(1, round(50_000 / classes)) * classes

    if e.class_names:
        template = e.class_template or origin.template or "{}"
        names = read_class_names(e.class_names)
        return class_balanced_prompts(names, num(len(names)), template)
    if e.prompts_file:
        return file_prompts(read_lines(e.prompts_file, "prompts"), e.num_images)
    if origin.kind == "class" and origin.class_prompts:
        if e.class_template:
            if not origin.class_names:
                raise UserError("--eval_class_template needs the class names: pass --eval_class_names too")
            return class_balanced_prompts(origin.class_names, num(len(origin.class_names)), e.class_template)
        prompts = class_balanced_prompts(origin.class_prompts, num(len(origin.class_prompts)), "{}")
        prompts.source = "training class prompts"
        prompts.extra["template"] = origin.template or None
        return prompts
    if origin.kind == "caption" and training_captions is not None:
        captions = training_captions(e.num_images or 30_000)
        if captions:
            prompts = file_prompts(captions, e.num_images)
            prompts.source = "training captions"
            return prompts
    return None


def log_unseen(prompts: PromptSet, known: Callable[[Sequence[str]], list[bool]]) -> None:
    """Prompts the model never saw in training are allowed (open vocabulary), and said so.
    ``known(prompts)``: whether each appeared among the training captions."""
    unique = list(dict.fromkeys(prompts.prompts))
    unseen = [p for p, k in zip(unique, known(unique)) if not k]
    if unseen:
        log.info(
            "%d of %d evaluation prompts never appeared in training (open vocabulary), e.g. %r",
            len(unseen),
            len(set(prompts.prompts)),
            unseen[0],
        )
    prompts.extra["unseen_prompts"] = len(unseen)


def eval_options(
    e: EvalConfig, seed: int, origin: CaptionOrigin, training_captions: Callable[[int], list[str]] | None = None
) -> EvalOptions:
    """The options of the ``eval`` section; prompt files are read (and checked) here, at start-up."""
    return EvalOptions(
        prompts=eval_prompts(e, origin, training_captions),
        fid_ref=e.fid_ref,
        metrics=tuple(m for m in e.metrics.split(",") if m),
        feature_extractor=e.feature_extractor,
        inception_weights=e.inception_weights,
        save_npz=e.save_npz,
        save_samples=e.save_samples,
        clip_score_model=e.clip_score_model,
        clip_score_weights=e.clip_score_weights,
        batch_size=e.batch_size,
        per_combo=e.per_combo,
        probe=e.probe,
        probe_sizes=(e.probe_train, e.probe_test),
        seed=seed,
    )


def check_options(options: EvalOptions) -> list[str]:
    """The fidelity metrics that will be computed; unknown metrics and missing Inception weights,
    reference or CLIP weights are errors raised now (naming the path), not after generating."""
    wanted = [m for m in options.metrics if m == "isc" or options.fid_ref]
    unknown = set(options.metrics) - set(fid.METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {fid.METRICS}")
    if wanted:
        fid.extractor_kwargs(options.feature_extractor, options.inception_weights)
    if options.fid_ref and not Path(options.fid_ref).exists():
        raise FileNotFoundError(f"no FID reference at {options.fid_ref} (a statistics .npz or an image folder)")
    weights = options.clip_score_weights
    if weights and (Path(weights).suffix or "/" in weights) and not Path(weights).expanduser().is_file():
        raise FileNotFoundError(
            f"no CLIP weights at {weights} for the CLIP score; leave out --clip_score_weights to skip it"
        )
    return wanted


def evaluate(
    gen: ImageGenerator,
    options: EvalOptions,
    out_dir: Path,
    step: int,
    env: DistEnv,
    builtin_eval: str | None,
    record: dict | None = None,
    logger=None,
) -> dict:
    """Run the evaluation the options ask for and write ``out_dir/metrics.json`` (rank 0).

    A prompt set is generated by every rank (each with the whole model in ``gen``); without one,
    the evaluation of the built-in set the model was trained on (``builtin_eval``: ``shapes``,
    ``pairs`` or None) runs on rank 0 alone.
    ``record``: fields copied into metrics.json (step, checkpoint); ``logger``: a ``RunLogger`` that
    gets the figures and grids. Returns the metrics ({} elsewhere).
    """
    out_dir = Path(out_dir)
    if options.prompts is not None:
        metrics = evaluate_prompts(gen, options, out_dir, env)
    elif builtin_eval == "shapes":
        metrics = evaluate_shapes(gen, out_dir, options.per_combo, options.seed) if env.is_main else {}
        if metrics and options.probe:
            img_size = gen.grid * gen.patch * gen.tokenizer.stride
            metrics["probe"] = probe.probe_shapes(
                gen.model, gen.tokenizer, gen.patch, img_size, gen.device, *options.probe_sizes, seed=options.seed
            )
    elif builtin_eval == "pairs":
        metrics = evaluate_pairs(gen, out_dir, options.per_combo, options.seed) if env.is_main else {}
        if metrics and options.probe:
            log.info("no probe: the linear probe reads single shapes, and this model was trained on pairs")
    elif builtin_eval is not None:
        raise ValueError(f"unknown built-in evaluation {builtin_eval!r}; choices: shapes, pairs, None")
    else:
        if env.is_main:
            log.info("no evaluation: pass --eval_class_names or --eval_prompts_file (this dataset has no built-in one)")
        metrics = {}
    if not metrics:
        return {}
    metrics = {"step": step, **(record or {}), "sampling": asdict(gen.sampling), "seed": options.seed, **metrics}
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if logger is not None:
        log_metrics(logger, metrics, step, out_dir)
    return metrics


def evaluate_prompts(gen: ImageGenerator, options: EvalOptions, out_dir: Path, env: DistEnv) -> dict:
    """Every rank generates its share of the prompt set's ids and computes their Inception (or
    other extractor's) features in memory, writing PNGs when asked; rank 0 gathers the features in
    id order, so the metrics do not depend on the number of ranks, and writes the grid, the
    manifest, the optional .npz and the metrics. Other ranks return {}."""
    prompt_set = options.prompts
    wanted = check_options(options)  # fail before generating, on every rank, not after
    n = len(prompt_set)
    # the ADM .npz and the CLIP score are read back from the PNGs
    write = options.save_samples or options.save_npz or bool(options.clip_score_weights)
    layers = fid.metric_layers(options.feature_extractor, wanted) if wanted else []
    features = (
        fid.Features(options.feature_extractor, layers, gen.device, options.batch_size, options.inception_weights)
        if layers
        else None
    )
    share, seconds, feature_seconds = _generate_share(
        gen, options, out_dir / "samples" if write else None, env, features
    )
    shares = env.gather_to_main(share)
    if shares is None:
        env.barrier()
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict = {
        "num_samples": n,
        "ranks": env.world_size,
        "prompts": prompt_set.source,
        "num_classes": prompt_set.num_classes,
        **prompt_set.extra,
        "generation_seconds": seconds,  # on rank 0 (each rank generates its share)
        "seconds_per_image": seconds * env.world_size / n,
        "feature_seconds": feature_seconds,  # the extractor on rank 0's images, in memory
        "samples_folder": str(out_dir / "samples") if write else None,
    }
    first_images = {i: img for _, _, share in shares for i, img in share.items()}
    grid = torch.stack([first_images[i] for i in sorted(first_images)]).float() / 255
    from torchvision.utils import save_image  # torchvision (and torch._dynamo) only where images are written

    save_image(grid, out_dir / "grid.png", nrow=8, padding=1, pad_value=0.5)
    _write_manifest(out_dir, prompt_set, options.seed)
    if options.save_npz:
        images = SampleFolder(out_dir / "samples", n).stack()
        save_adm_npz(out_dir / f"samples_{n}x{images.shape[2]}x{images.shape[3]}x3.npz", images, prompt_set.labels)
        del images
    if len(wanted) < len(options.metrics):
        metrics["fidelity_skipped"] = {m: "no --fid_ref" for m in options.metrics if m not in wanted}
        log.info("%s skipped: no --fid_ref", ", ".join(metrics["fidelity_skipped"]))
    if wanted:
        all_ids = [i for share_ids, _, _ in shares for i in share_ids]
        if sorted(all_ids) != list(range(n)):
            raise RuntimeError(f"the ranks returned {len(all_ids)} images for {n} ids")
        position = torch.argsort(torch.tensor(all_ids))  # back to id order
        gathered = {k: torch.cat([f[k] for share_ids, f, _ in shares if share_ids])[position] for k in layers}
        metrics["fidelity"] = fid.compute_metrics(
            gathered,
            options.fid_ref,
            wanted,
            options.feature_extractor,
            gen.device,
            options.batch_size,
            options.inception_weights,
        )
        log.info("%s", fid.describe(metrics["fidelity"]))
    if options.clip_score_weights:
        metrics["clip_score"] = clip_score.clip_score(
            SampleFolder(out_dir / "samples", n),
            prompt_set.prompts,
            options.clip_score_model,
            options.clip_score_weights,
            gen.device,
            options.batch_size,
        )
        log.info("CLIP score %.3f (%s, %d samples)", metrics["clip_score"]["clip_score"], options.clip_score_model, n)
    else:
        metrics["clip_score"] = {"skipped": "no --clip_score_weights (an open_clip checkpoint file or pretrained tag)"}
        log.info("CLIP score skipped: pass --clip_score_weights to compute it")
    env.barrier()
    return metrics


GRID_IMAGES = 64  # the first ids, shown in grid.png


def _generate_share(
    gen: ImageGenerator, options: EvalOptions, folder: Path | None, env: DistEnv, features: fid.Features | None
) -> tuple[tuple, float, float]:
    """This rank's images: written to ``folder`` (when given), their features computed in memory.
    Returns ((ids, {layer: features}, {id: image} of the grid's ids), generation s, feature s)."""
    t0, feature_seconds = time.time(), 0.0
    ids, feats, first = [], [], {}
    for batch_ids, images in gen.generate_share(options.prompts.prompts, options.seed, env, options.batch_size):
        if folder is not None:
            write_pngs(images, batch_ids, folder)
        if features is not None:
            t1 = time.time()
            feats.append(features(images))
            feature_seconds += time.time() - t1
        ids.extend(batch_ids)
        first.update({i: img for i, img in zip(batch_ids, images) if i < GRID_IMAGES})
    layers = list(feats[0]) if feats else []
    return (ids, _cat(feats, layers), first), time.time() - t0 - feature_seconds, feature_seconds


def _cat(feats: list[dict[str, torch.Tensor]], layers: list[str]) -> dict[str, torch.Tensor]:
    """One rank's per-batch features joined per layer (None for a rank without images)."""
    return {k: torch.cat([f[k] for f in feats]) if feats else None for k in layers}


def _write_manifest(out_dir: Path, prompt_set: PromptSet, seed: int) -> None:
    with open(out_dir / "manifest.jsonl", "w") as f:
        for i, p in enumerate(prompt_set.prompts):
            row = {"file": f"samples/{image_name(i)}", "id": i, "prompt": p, "seed": image_seed(seed, i)}
            if prompt_set.labels is not None:
                row["label"] = prompt_set.labels[i]
            f.write(json.dumps(row) + "\n")


def metric_scalars(metrics: dict) -> dict[str, float]:
    """The figures of a metrics.json as ``eval/<name>`` scalars (FID named with its sample count,
    e.g. ``eval/FID-1K``): what the loggers get and what curves.png plots."""
    out: dict[str, float] = {}
    fidelity = metrics.get("fidelity", {})
    if "fid" in fidelity:
        out[f"eval/{fidelity['fid_label']}"] = fidelity["fid"]
    for key in ("inception_score_mean", "precision", "recall", "kid_mean"):
        if key in fidelity:
            out[f"eval/{key}"] = fidelity[key]
    if "clip_score" in metrics.get("clip_score", {}):
        out["eval/clip_score"] = metrics["clip_score"]["clip_score"]
    for key, value in metrics.get("probe", {}).items():
        if isinstance(value, float):
            out[f"eval/probe_{key}"] = value
    for split in ("seen", "heldout", "heldout_words"):
        if split in metrics:
            for k in ("color_acc", "shape_acc", "joint_acc"):
                out[f"eval/{split}_{k}"] = metrics[split][k]
    for split in ("pairs_seen", "pairs_heldout"):
        if split in metrics:
            for k in ("objects_acc", "relation_acc", "joint_acc"):
                out[f"eval/{split}_{k}"] = metrics[split][k]
    return out


def log_metrics(logger, metrics: dict, step: int, out_dir: Path) -> None:
    """The scalars of :func:`metric_scalars` and the evaluation grids, to a ``RunLogger`` (or a
    TensorBoard ``SummaryWriter``: the same three calls)."""
    for tag, value in metric_scalars(metrics).items():
        logger.add_scalar(tag, value, step)
    for name in ("grid", "grid_seen", "grid_heldout", "grid_pairs_seen", "grid_pairs_heldout"):
        path = out_dir / f"{name}.png"
        if path.is_file():
            logger.add_image(f"eval/{name}", np.asarray(Image.open(path).convert("RGB")), step, dataformats="HWC")


def training_grid(gen: ImageGenerator, prompts: list[str], seed: int) -> tuple[torch.Tensor, list[str]]:
    """A grid [3,H,W] in [0,1] of one image for each prompt (a spread of the training captions)."""
    images = gen.generate(prompts, seed)
    from torchvision.utils import make_grid

    return make_grid((images + 1) / 2, nrow=6, padding=1), list(prompts)
