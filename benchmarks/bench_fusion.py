"""The paper's fusion ablation on ``shapes``: train each fusion variant with the same budget, seed
and recipe (the shapes recipe, configs/shapes.yaml), then print the judged accuracy on seen and held-out
color-shape prompts and the linear-probe accuracy of each frozen encoder side by side.

    full        input-level condition + post-predictor cross-attention + raw-text injection
    input_only  the input-level condition only
    late_only   cross-attention and injection, without the input-level condition
    none        unconditional (the caption never reaches the model)

    python benchmarks/bench_fusion.py                                 # the default recipe: 3000 steps
    python benchmarks/bench_fusion.py --modes full,late_only --seeds 0,1,2   # + mean and spread over seeds
    python benchmarks/bench_fusion.py --steps 300 --modes full,late_only -- --device cuda

Each variant's run is ``<output_dir>/seed<S>/<mode>``; ``--reuse`` evaluates the checkpoints already
there instead of training again (after a change to the evaluation, or to add figures).

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

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_jepat  # noqa: E402
from models.jepat import FUSION_MODES  # noqa: E402


def run_variant(a, rest: list, mode: str, seed: int, folder: Path, per_epoch: int, batch: int) -> dict:
    """Train one variant (or, with --reuse, evaluate its existing checkpoint-last.pth) and return its row."""
    judged = [
        "--eval_per_combo",
        str(a.eval_per_combo),
        "--probe",
        "--probe_train",
        str(a.probe_train),
        "--probe_test",
        str(a.probe_test),
    ]
    ckpt, done = folder / "checkpoint-last.pth", folder / "row.json"
    t0 = time.time()
    if a.reuse and done.is_file() and ckpt.is_file() and done.stat().st_mtime > ckpt.stat().st_mtime:
        row = json.loads(done.read_text())
        if "evaluated" in row:
            return row  # evaluated after its checkpoint was written
    if a.reuse and ckpt.is_file():
        m = main_jepat.main(
            main_jepat.parse_args(
                rest
                + judged
                + ["--evaluate", "--resume", str(ckpt), "--seed", str(seed), "--output_dir", str(folder / "eval")]
            )
        )
        trained = json.loads((folder / "row.json").read_text()) if (folder / "row.json").is_file() else {}
        m = {**m, "train_seconds": trained.get("train_seconds")}
    else:
        m = main_jepat.main(
            main_jepat.parse_args(
                rest
                + judged
                + [
                    "--fusion",
                    mode,
                    "--seed",
                    str(seed),
                    "--epochs",
                    str(a.epochs),
                    "--num_samples",
                    str(per_epoch * batch),
                    "--output_dir",
                    str(folder),
                    "--save_freq",
                    "0",
                    "--grid_freq",
                    "0",
                ]
            )
        )
        if "stopped_by_signal" in m:
            raise SystemExit(f"the {mode} run was stopped by signal {m['stopped_by_signal']} at step {m['step']}")
    row = {
        "fusion": mode,
        "seed": seed,
        "steps": m["step"],
        "train_seconds": m["train_seconds"],
        "total_seconds": time.time() - t0,
        "seen": m["seen"],
        "heldout": m["heldout"],
        "probe": m["probe"],
        "evaluated": time.time(),
    }
    (folder / "row.json").write_text(json.dumps(row, indent=2))
    return row


def summarize(rows: list) -> None:
    """Mean and standard deviation over seeds of every figure, per fusion mode."""
    figures = [
        ("seen", "joint_acc", "seen joint"),
        ("heldout", "joint_acc", "held joint"),
        ("seen", "fd", "FD seen"),
        ("seen", "spread", "spread"),
        ("heldout", "fd", "FD held"),
        ("probe", "shape_acc", "probe shape"),
    ]
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nover seeds {seeds}: mean +- standard deviation (n = seeds)")
    print(f"{'fusion':>10} {'n':>2} | " + " | ".join(f"{name:>15}" for _, _, name in figures))
    for mode in dict.fromkeys(r["fusion"] for r in rows):
        mine = [r for r in rows if r["fusion"] == mode]
        cells = []
        for part, key, _ in figures:
            v = np.array([r[part][key] for r in mine if key in r[part]], dtype=float)
            cells.append(f"{v.mean():7.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:5.3f}" if len(v) else f"{'-':>15}")
        print(f"{mode:>10} {len(mine):2d} | " + " | ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="optimizer steps per variant (the budget)")
    p.add_argument("--epochs", type=int, default=3, help="epochs the budget is spread over")
    p.add_argument("--modes", default=",".join(FUSION_MODES), help=f"comma-separated subset of {FUSION_MODES}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains every mode")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="evaluate an existing <output_dir>/seed<S>/<mode>/checkpoint-last.pth instead of training "
        "(read back its row.json when that is newer than the checkpoint)",
    )
    p.add_argument("--eval_per_combo", type=int, default=16)
    p.add_argument("--probe_train", type=int, default=1000)
    p.add_argument("--probe_test", type=int, default=500)
    p.add_argument("--output_dir", default="output/bench_fusion")
    p.add_argument("rest", nargs="*", help="after --: extra main_jepat.py arguments")
    a = p.parse_args()
    batch = main_jepat.parse_args(a.rest).config.optim.batch_size
    per_epoch = math.ceil(a.steps / a.epochs)
    modes = a.modes.split(",")
    for mode in modes:
        if mode not in FUSION_MODES:
            raise SystemExit(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")
    rows = []
    for seed in (int(x) for x in a.seeds.split(",")):
        for mode in modes:
            rows.append(run_variant(a, a.rest, mode, seed, Path(a.output_dir) / f"seed{seed}" / mode, per_epoch, batch))
            (Path(a.output_dir) / "bench_fusion.json").write_text(json.dumps(rows, indent=2))  # after every variant
    print(
        f"\nfusion ablation on shapes: {a.steps} steps of {batch} images each, "
        f"{a.eval_per_combo} judged images per combination (240 seen / 48 held-out at 16)"
    )
    print(
        f"{'fusion':>10} {'seed':>4} {'steps':>5} | {'seen joint':>10} {'color':>5} {'shape':>5} | "
        f"{'held joint':>10} {'color':>5} {'shape':>5} | {'FD seen':>7} {'floor':>5} {'spread':>6} | "
        f"{'probe color':>11} {'probe shape':>11}"
    )
    for r in rows:
        s, h, pr = r["seen"], r["heldout"], r["probe"]
        print(
            f"{r['fusion']:>10} {r['seed']:4d} {r['steps']:5d} | {s['joint_acc']:10.3f} "
            f"{s['color_acc']:5.2f} {s['shape_acc']:5.2f} | {h['joint_acc']:10.3f} {h['color_acc']:5.2f} "
            f"{h['shape_acc']:5.2f} | {s.get('fd', float('nan')):7.1f} {s.get('fd_floor', float('nan')):5.1f} "
            f"{s.get('spread', float('nan')):6.2f} | {pr['color_acc']:11.3f} {pr['shape_acc']:11.3f}"
        )
    base = rows[0]["probe"]
    print(
        f"probe baselines (seed {rows[0]['seed']}): random-init encoder color "
        f"{base['random_init_encoder']['color_acc']:.3f} "
        f"shape {base['random_init_encoder']['shape_acc']:.3f}; raw pixels color {base['raw_pixels']['color_acc']:.3f} "
        f"shape {base['raw_pixels']['shape_acc']:.3f}"
    )
    if len({r["seed"] for r in rows}) > 1:
        summarize(rows)


if __name__ == "__main__":
    main()
