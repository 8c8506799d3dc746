"""Evaluation on the built-in ``pairs`` set: generate two-object scenes for seen and for held-out
bindings (util/data/pairs.py), judge every image (util/evaluation/pairs_judge.py), and write
grids, per-image PNGs and a manifest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from util.data import pairs
from util.evaluation import pairs_judge
from util.evaluation.generate import ImageGenerator, generate_split, write_manifest

log = logging.getLogger(__name__)

Binding = tuple[pairs.Obj, pairs.Obj]


def pairs_prompts(bindings: Sequence[Binding], per_pair: int) -> tuple[list[str], list[pairs.PairTarget]]:
    """``per_pair`` prompts per binding: image k asks for relation ``RELATIONS[k % 4]``, names the
    binding's objects in its order for even ``k // 4`` and swapped for odd, and cycles through the
    caption variants."""
    prompts, targets = [], []
    for a, b in bindings:
        for k in range(per_pair):
            first, second = (a, b) if (k // len(pairs.RELATIONS)) % 2 == 0 else (b, a)
            target = pairs.PairTarget(first, pairs.RELATIONS[k % len(pairs.RELATIONS)], second)
            prompts.append(pairs.caption(target, k % pairs.NUM_VARIANTS))
            targets.append(target)
    return prompts, targets


def evaluate_pairs(gen: ImageGenerator, out_dir: Path, per_pair: int, seed: int) -> dict:
    """Judged objects / relation / joint accuracy for the seen (``pairs.SEEN_EVAL_PAIRS``) and the
    held-out (``pairs.HELDOUT_PAIRS``) bindings, ``per_pair`` images each, with
    ``grid_pairs_seen.png`` and ``grid_pairs_heldout.png`` (one row per binding) and
    ``samples/<split>/*.png`` listed with their prompts and judgements in ``manifest.jsonl``.
    Returns the metrics: ``pairs_seen`` and ``pairs_heldout`` (``pairs_judge.score_pairs``)."""
    if per_pair < 1:
        raise ValueError(f"per_pair must be >= 1, got {per_pair}")
    out_dir = Path(out_dir)
    metrics: dict = {"images_per_pair": per_pair}
    manifest = []
    splits = (
        ("pairs_seen", pairs_prompts(pairs.SEEN_EVAL_PAIRS, per_pair), 0),
        ("pairs_heldout", pairs_prompts(pairs.HELDOUT_PAIRS, per_pair), 1),
    )
    gen.captions.require([p for _, (prompts, _), _ in splits for p in prompts])  # the encoder is built now if needed
    for split, (prompts, targets), offset in splits:
        images, names, seconds = generate_split(gen, prompts, seed + offset, out_dir, split, per_pair)
        judged = pairs_judge.judge_pairs(images, targets)
        result = pairs_judge.score_pairs(judged)
        result["seconds_per_image"] = seconds
        metrics[split] = result
        for name, p, t, j in zip(names, prompts, targets, judged):
            manifest.append(
                {
                    "file": f"samples/{split}/{name}",
                    "split": split,
                    "prompt": p,
                    "target": {"first": list(t.first), "relation": t.relation, "second": list(t.second)},
                    "judged": j.to_dict(),
                    "correct": j.joint_ok,
                }
            )
        log.info(
            "%s: joint %.3f objects %.3f relation %.3f axis %.3f over %d images (%d without exactly two objects; "
            "%.2f s/image)",
            split,
            result["joint_acc"],
            result["objects_acc"],
            result["relation_acc"],
            result["axis_acc"],
            result["n"],
            result["not_two_objects"],
            result["seconds_per_image"],
        )
    write_manifest(out_dir, manifest)
    metrics["num_samples"] = sum(metrics[s]["n"] for s, *_ in splits)
    return metrics
