"""The paper's fusion ablation on ``shapes``: train each fusion variant with the same budget, seed
and recipe (the shapes recipe of util/recipes.py), then print the judged accuracy on seen and held-out
color-shape prompts and the linear-probe accuracy of each frozen encoder side by side.

    full        input-level condition + post-predictor cross-attention + raw-text injection
    input_only  the input-level condition only
    late_only   cross-attention and injection, without the input-level condition
    none        unconditional (the caption never reaches the model)

    python benchmarks/bench_fusion.py                                 # the default recipe: 3000 steps
    python benchmarks/bench_fusion.py --steps 300 --modes full,late_only -- --device cuda

The budget keeps the recipe's shape: ``--epochs`` epochs of ceil(steps / epochs) batches, so the
warmup and the cosine schedules complete. Arguments after ``--`` go to main_jepat.py.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_jepat  # noqa: E402
from models.jepat import FUSION_MODES  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per variant (the budget)")
    p.add_argument("--epochs", type=int, default=3, help="epochs the budget is spread over")
    p.add_argument("--modes", default=",".join(FUSION_MODES), help=f"comma-separated subset of {FUSION_MODES}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval_per_combo", type=int, default=16)
    p.add_argument("--probe_train", type=int, default=1000)
    p.add_argument("--probe_test", type=int, default=500)
    p.add_argument("--output_dir", default="output/bench_fusion")
    p.add_argument("rest", nargs="*", help="after --: extra main_jepat.py arguments")
    a = p.parse_args()
    batch = main_jepat.parse_args(a.rest).batch_size
    per_epoch = math.ceil(a.steps / a.epochs)
    rows = []
    for mode in a.modes.split(","):
        if mode not in FUSION_MODES:
            raise SystemExit(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")
        args = main_jepat.parse_args(a.rest + [
            "--fusion", mode, "--seed", str(a.seed), "--epochs", str(a.epochs), "--num_samples", str(per_epoch * batch),
            "--eval_per_combo", str(a.eval_per_combo), "--output_dir", str(Path(a.output_dir) / mode),
            "--save_freq", "0", "--grid_freq", "0", "--probe", "--probe_train", str(a.probe_train),
            "--probe_test", str(a.probe_test)])
        t0 = time.time()
        m = main_jepat.main(args)
        if "stopped_by_signal" in m:
            raise SystemExit(f"the {mode} run was stopped by signal {m['stopped_by_signal']} at step {m['step']}")
        rows.append({"fusion": mode, "steps": m["step"], "train_seconds": m["train_seconds"],
                     "total_seconds": time.time() - t0, "seen": m["seen"], "heldout": m["heldout"], "probe": m["probe"]})
        (Path(a.output_dir) / "bench_fusion.json").write_text(json.dumps(rows, indent=2))   # after every variant
    print(f"\nfusion ablation on shapes: {a.steps} steps of {batch} images each, seed {a.seed}, "
          f"{a.eval_per_combo} judged images per combination (240 seen / 48 held-out at 16)")
    print(f"{'fusion':>10} {'steps':>5} {'train s':>7} | {'seen joint':>10} {'color':>5} {'shape':>5} | "
          f"{'held joint':>10} {'color':>5} {'shape':>5} | {'probe color':>11} {'probe shape':>11}")
    for r in rows:
        s, h, pr = r["seen"], r["heldout"], r["probe"]
        print(f"{r['fusion']:>10} {r['steps']:5d} {r['train_seconds']:7.0f} | {s['joint_acc']:10.3f} "
              f"{s['color_acc']:5.2f} {s['shape_acc']:5.2f} | {h['joint_acc']:10.3f} {h['color_acc']:5.2f} "
              f"{h['shape_acc']:5.2f} | {pr['color_acc']:11.3f} {pr['shape_acc']:11.3f}")
    base = rows[0]["probe"]
    print(f"probe baselines (seed {a.seed}): random-init encoder color {base['random_init_encoder']['color_acc']:.3f} "
          f"shape {base['random_init_encoder']['shape_acc']:.3f}; raw pixels color {base['raw_pixels']['color_acc']:.3f} "
          f"shape {base['raw_pixels']['shape_acc']:.3f}")


if __name__ == "__main__":
    main()
