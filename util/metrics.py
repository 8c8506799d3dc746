"""Evaluation on the built-in ``shapes`` set: generate for seen and held-out color-shape
combinations, judge every image, and write grids, per-image PNGs, a manifest and metrics.json."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.utils import save_image

from engine_jepat import generate_images
from models.jepat import JEPAT
from models.sampler import SamplingConfig
from models.tokenizers import Tokenizer
from util import shapes
from util.text_cache import TextEmbeddingTable

log = logging.getLogger(__name__)


def shapes_prompts(combos: Sequence[Tuple[str, str]], per_combo: int) -> Tuple[List[str], List[Tuple[str, str]]]:
    """``per_combo`` prompts per combination, cycling through the caption templates."""
    prompts, targets = [], []
    for color, shape in combos:
        for i in range(per_combo):
            prompts.append(shapes.caption(color, shape, i % len(shapes.TEMPLATES)))
            targets.append((color, shape))
    return prompts, targets


def save_images(images: torch.Tensor, folder: Path) -> List[str]:
    """images [N,3,H,W] in [-1,1] -> folder/00000.png ...; returns the file names."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(images):
        name = f"{i:05d}.png"
        save_image((img + 1) / 2, folder / name)
        names.append(name)
    return names


def evaluate_shapes(model: JEPAT, text_table: TextEmbeddingTable, tokenizer: Tokenizer, sampling: SamplingConfig,
                    patch_size: int, out_dir: Path, per_combo: int, seed: int, device: torch.device,
                    precision: str, step: int, checkpoint: Optional[str] = None) -> Dict:
    """Judged color / shape / joint accuracy for seen and held-out prompts, written to
    ``out_dir/metrics.json``, with ``grid_seen.png``, ``grid_heldout.png`` (one row per
    combination) and ``samples/<split>/*.png`` listed with their prompts in ``manifest.jsonl``."""
    out_dir = Path(out_dir)
    metrics: Dict = {"step": step, "checkpoint": checkpoint, "sampling": asdict(sampling),
                     "images_per_combo": per_combo, "seed": seed}
    manifest = []
    for split, combos in (("seen", shapes.SEEN_COMBOS), ("heldout", shapes.HELDOUT_COMBOS)):
        prompts, targets = shapes_prompts(combos, per_combo)
        t0 = time.time()
        images = generate_images(model, text_table, tokenizer, prompts, sampling, patch_size,
                                 seed=seed + (0 if split == "seen" else 1), device=device, precision=precision)
        seconds = time.time() - t0
        judged = shapes.judge_batch(images)
        result = shapes.score(judged, targets)
        result["seconds_per_image"] = seconds / len(prompts)
        metrics[split] = result
        save_image((images + 1) / 2, out_dir / f"grid_{split}.png", nrow=per_combo, padding=1, pad_value=0.5)
        names = save_images(images, out_dir / "samples" / split)
        for name, p, t, j in zip(names, prompts, targets, judged):
            manifest.append({"file": f"samples/{split}/{name}", "split": split, "prompt": p,
                             "target": list(t), "judged": list(j), "correct": tuple(j) == tuple(t)})
        log.info("%s: joint %.3f color %.3f shape %.3f over %d images (%.2f s/image)", split,
                 result["joint_acc"], result["color_acc"], result["shape_acc"], result["n"], result["seconds_per_image"])
    with open(out_dir / "manifest.jsonl", "w") as f:
        for row in manifest:
            f.write(json.dumps(row) + "\n")
    with open(out_dir / "metrics.json", "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
