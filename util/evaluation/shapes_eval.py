"""Evaluation on the built-in ``shapes`` set: generate for seen and held-out color-shape
combinations, and for seen combinations named in words and templates training never showed
(``heldout_words``), judge every image, and write grids, per-image PNGs and a manifest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from util.data import shapes
from util.evaluation import judge
from util.evaluation.generate import ImageGenerator, generate_split, write_manifest
from util.evaluation.shapes_fidelity import fidelity

log = logging.getLogger(__name__)


def shapes_prompts(combos: Sequence[tuple[str, str]], per_combo: int) -> tuple[list[str], list[tuple[str, str]]]:
    """``per_combo`` prompts per combination, cycling through the caption templates."""
    prompts, targets = [], []
    for color, shape in combos:
        for i in range(per_combo):
            prompts.append(shapes.caption(color, shape, i % len(shapes.TEMPLATES)))
            targets.append((color, shape))
    return prompts, targets


def unseen_word_prompts(combos: Sequence[tuple[str, str]], per_combo: int) -> tuple[list[str], list[tuple[str, str]]]:
    """``per_combo`` held-out-words prompts per combination (util/data/shapes.py)."""
    prompts, targets = [], []
    for color, shape in combos:
        for k in range(per_combo):
            prompts.append(shapes.unseen_word_prompt(color, shape, k))
            targets.append((color, shape))
    return prompts, targets


def evaluate_shapes(gen: ImageGenerator, out_dir: Path, per_combo: int, seed: int) -> dict:
    """Judged color / shape / joint accuracy and fidelity to the data's variety (shapes_fidelity.py)
    for seen and held-out prompts, with ``grid_seen.png``,
    ``grid_heldout.png`` (one row per combination) and ``samples/<split>/*.png`` listed with their
    prompts and judgements in ``manifest.jsonl``. Returns the metrics."""
    out_dir = Path(out_dir)
    metrics: dict = {"images_per_combo": per_combo}
    manifest = []
    words = unseen_word_prompts(shapes.SEEN_COMBOS, max(1, per_combo // 2))
    gen.captions.require(words[0])  # encoded by the run's text encoder (built now if the store has none)
    splits = (
        ("seen", shapes_prompts(shapes.SEEN_COMBOS, per_combo), 0, per_combo),
        ("heldout", shapes_prompts(shapes.HELDOUT_COMBOS, per_combo), 1, per_combo),
        ("heldout_words", words, 2, max(1, per_combo // 2)),
    )
    for split, (prompts, targets), offset, per_row in splits:
        images, names, seconds = generate_split(gen, prompts, seed + offset, out_dir, split, per_row)
        judged = judge.judge_batch(images)
        result = judge.score(judged, targets)
        result["seconds_per_image"] = seconds
        result.update(fidelity(images, targets, seed + offset))
        metrics[split] = result
        for name, p, t, j in zip(names, prompts, targets, judged):
            manifest.append(
                {
                    "file": f"samples/{split}/{name}",
                    "split": split,
                    "prompt": p,
                    "target": list(t),
                    "judged": list(j),
                    "correct": tuple(j) == tuple(t),
                }
            )
        log.info(
            "%s: joint %.3f color %.3f shape %.3f over %d images (%.2f s/image); fidelity FD %.1f "
            "(rendered vs rendered %.1f), spread %.2f of the data's",
            split,
            result["joint_acc"],
            result["color_acc"],
            result["shape_acc"],
            result["n"],
            result["seconds_per_image"],
            result["fd"],
            result["fd_floor"],
            result["spread"],
        )
    write_manifest(out_dir, manifest)
    metrics["num_samples"] = sum(metrics[s]["n"] for s, *_ in splits)
    return metrics
