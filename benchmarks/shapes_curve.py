"""Judged shapes accuracy against training time: evaluates every checkpoint-<epoch>.pth of a
run folder (written with --save_freq 1) with the run's own sampling settings and prints a table
of training minutes, step, and seen / held-out joint accuracy.

    python main_jepat.py --save_freq 1 --output_dir output/curve        # any shapes run
    python benchmarks/shapes_curve.py output/curve [--eval_per_combo 16]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_jepat  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--eval_per_combo", type=int, default=16)
    a = p.parse_args()
    run = Path(a.run_dir)
    ckpts = sorted(run.glob("checkpoint-[0-9]*.pth"), key=lambda f: int(re.findall(r"\d+", f.name)[0]))
    if not ckpts:
        raise SystemExit(f"no checkpoint-<epoch>.pth in {run}; train with --save_freq 1")
    rows = []
    for ckpt in ckpts:
        args = main_jepat.parse_args(
            [
                "--evaluate",
                "--resume",
                str(ckpt),
                "--eval_per_combo",
                str(a.eval_per_combo),
                "--output_dir",
                str(run / "curve" / ckpt.stem),
            ]
        )
        m = main_jepat.main(args)
        secs = torch.load(ckpt, map_location="cpu", weights_only=True)["state"].get("train_seconds", float("nan"))
        rows.append((secs / 60, m["step"], m["seen"]["joint_acc"], m["heldout"]["joint_acc"]))
    print(f"{'train min':>9} {'step':>6} {'seen joint':>10} {'held-out joint':>14}")
    for minutes, step, seen, held in rows:
        print(f"{minutes:9.1f} {step:6d} {seen:10.3f} {held:14.3f}")


if __name__ == "__main__":
    main()
