"""Trainable parameter counts of the presets, by part, against the published JEPA-T code
(counted by instantiating it; see the design notes). The frozen text encoder and VAE are not
counted. Setting: MAR's KL-16 VAE at 256 px (256 tokens of 16 channels), CLIP ViT-L/14 text
(768-wide token states and pooled vector).

    python benchmarks/param_counts.py
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.jepat import build_model  # noqa: E402

REFERENCE = {"base": 216_152_080, "large": 694_769_168, "huge": 1_438_206_992}


def main() -> None:
    for preset, ref in REFERENCE.items():
        with torch.device("meta"):
            model = build_model(
                preset, token_dim=16, seq_len=256, text_token_dim=768, text_pooled_dim=768, fusion="full"
            )  # the published code's model
        counts = model.num_params()
        print(
            f"{preset}: {counts['total']:,} trainable vs reference {ref:,} ({100 * (counts['total'] / ref - 1):+.2f}%)"
        )
        for part, n in counts.items():
            if part != "total":
                print(f"    {part:<60s} {n:>14,}")


if __name__ == "__main__":
    main()
