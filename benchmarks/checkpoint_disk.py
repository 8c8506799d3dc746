"""Disk a run's checkpoints take under each recipe's checkpoint policy, against one checkpoint per
epoch kept for good. A checkpoint holds the model, its EMA and AdamW's two moments in float32
(16 bytes per parameter); the models are built on the meta device, so this runs in a second.

    python benchmarks/checkpoint_disk.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from main_jepat import checkpoint_policy  # noqa: E402
from models.jepat import build_model  # noqa: E402
from util.config import resolve  # noqa: E402
from util.training.preflight import checkpoint_bytes  # noqa: E402

TEXT_WIDTH = {"ViT-B-32": 512, "ViT-L-14": 768}  # CLIP token and pooled widths


def main() -> None:
    print(f"{'recipe':16s} {'epochs':>6s} {'checkpoint':>10s} {'policy':>34s} {'files':>5s} {'disk':>8s} {'all':>8s}")
    for preset in ("base", "large", "huge"):
        c = resolve([f"imagenet-{preset}"])
        width = TEXT_WIDTH[c.captions.clip_model]
        with torch.device("meta"):
            model = build_model(preset, token_dim=16, seq_len=256, text_token_dim=width, text_pooled_dim=width)
        one = checkpoint_bytes(model)
        files = checkpoint_policy(c).peak_files(c.optim.epochs)
        rt = c.runtime
        policy = f"every {rt.save_freq}, newest {rt.keep_last}, milestones {rt.milestone_every}"
        n = sum(files.values())
        print(
            f"imagenet-{preset:7s} {c.optim.epochs:6d} {one / 1e9:8.2f}GB {policy:>34s} {n:5d} "
            f"{n * one / 1e9:6.0f}GB {c.optim.epochs * one / 1e12:6.2f}TB"
        )


if __name__ == "__main__":
    main()
