"""The evaluation options of ``main_jepat.py`` and the glue between them and ``util/evaluation.py``,
``util/fid.py``, ``util/clip_score.py`` and ``util/probe.py``."""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict, Optional

import torch

from models.jepat import JEPAT
from models.sampler import SamplingConfig
from models.tokenizers import Tokenizer
from util.evaluation import (EvalOptions, PromptSet, class_balanced_prompts, evaluate_prompts, file_prompts,
                             log_to_tensorboard, rank_and_world, read_lines)
from util.text_cache import TextEmbeddingTable

log = logging.getLogger(__name__)


def add_evaluation_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("evaluation (FID / IS / precision-recall / CLIP score / linear probe)")
    g.add_argument("--eval_freq", type=int, default=0, help="also evaluate every N epochs during training (0: only at the end)")
    g.add_argument("--eval_class_names", default=None,
                   help="text file, one class name per line (ImageNet: 1000): class-balanced prompts")
    g.add_argument("--eval_class_template", default="{}", help="prompt for a class name, e.g. 'a photo of a {}'")
    g.add_argument("--eval_prompts_file", default=None, help="text file, one free-text prompt per line")
    g.add_argument("--num_images", type=int, default=None,
                   help="images to generate (default: 50000 for class names, one per prompt for a prompts file)")
    g.add_argument("--eval_batch_size", type=int, default=64, help="generation / feature batch per rank")
    g.add_argument("--fid_ref", default=None, help="FID reference: mu/sigma statistics .npz (e.g. ADM's) or an image folder")
    g.add_argument("--eval_metrics", default="fid,isc,prc", help="comma-separated subset of fid,isc,prc,kid")
    g.add_argument("--fid_feature_extractor", default="inception-v3-compat", help="a torch-fidelity feature extractor")
    g.add_argument("--inception_weights", default=None, help="default: torch-fidelity's file in the torch.hub cache")
    g.add_argument("--save_npz", action="store_true", help="also write the samples as an ADM-suite .npz (arr_0, arr_1)")
    g.add_argument("--clip_score_model", default="ViT-B-32", help="open_clip model of the CLIP score")
    g.add_argument("--clip_score_weights", default=None,
                   help="open_clip checkpoint file or cached pretrained tag; without it the CLIP score is skipped")
    g.add_argument("--probe", action="store_true", help="shapes: linear probe of the frozen encoder (color, shape)")
    g.add_argument("--probe_train", type=int, default=1000, help="probe training images")
    g.add_argument("--probe_test", type=int, default=500, help="probe test images")


def prompt_set(args: argparse.Namespace) -> Optional[PromptSet]:
    """Class-balanced prompts, prompts from a file, or None (the dataset's own evaluation)."""
    if args.eval_class_names and args.eval_prompts_file:
        raise SystemExit("give --eval_class_names or --eval_prompts_file, not both")
    if args.eval_class_names:
        names = read_lines(args.eval_class_names, "class names")
        return class_balanced_prompts(names, args.num_images or 50_000, args.eval_class_template)
    if args.eval_prompts_file:
        return file_prompts(read_lines(args.eval_prompts_file, "prompts"), args.num_images)
    return None


def options(args: argparse.Namespace) -> EvalOptions:
    return EvalOptions(fid_ref=args.fid_ref, metrics=tuple(m for m in args.eval_metrics.split(",") if m),
                       feature_extractor=args.fid_feature_extractor, inception_weights=args.inception_weights,
                       save_npz=args.save_npz, clip_score_model=args.clip_score_model,
                       clip_score_weights=args.clip_score_weights, batch_size=args.eval_batch_size)


def online_eval_dir(args: argparse.Namespace, out_dir: Path, epoch: int) -> Optional[Path]:
    """``out_dir/eval-epoch<N>`` (created) when an online evaluation is due after ``epoch``."""
    if not args.eval_freq or epoch % args.eval_freq or args.no_eval:
        return None
    path = Path(out_dir) / f"eval-epoch{epoch:04d}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def evaluate_generation(args: argparse.Namespace, ema: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer,
                        device: torch.device, out_dir: Path, step: int, sampling: SamplingConfig,
                        writer=None) -> Optional[Dict]:
    """The prompt-set evaluation when one is configured, else None."""
    prompts = prompt_set(args)
    if prompts is None:
        return None
    return evaluate_prompts(ema, text_table, tokenizer, prompts, sampling, args.patch_size, out_dir, args.seed,
                            device, args.precision, step, options(args), checkpoint=args.resume or None,
                            writer=writer)


def finish_shapes(args: argparse.Namespace, metrics: Dict, ema: JEPAT, tokenizer: Tokenizer, device: torch.device,
                  out_dir: Path, step: int, writer=None) -> Dict:
    """After the judged shapes evaluation: sample counts, the optional probe, the grid in
    TensorBoard, and metrics.json rewritten with all of it."""
    if rank_and_world()[0] != 0:
        return metrics
    metrics["num_samples"] = sum(metrics[s]["n"] for s in ("seen", "heldout"))
    if args.probe:
        from util.probe import probe_shapes
        metrics["probe"] = probe_shapes(ema, tokenizer, args.patch_size, args.img_size, device, args.probe_train,
                                        args.probe_test, args.seed)
    with open(Path(out_dir) / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    if writer is not None:
        log_to_tensorboard(writer, metrics, step)
        from PIL import Image
        import numpy as np
        for split in ("seen", "heldout"):
            grid = np.asarray(Image.open(Path(out_dir) / f"grid_{split}.png").convert("RGB"))
            writer.add_image(f"eval/grid_{split}", grid, step, dataformats="HWC")
    return metrics
