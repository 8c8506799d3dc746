"""The paper's fusion ablation on a built-in set: train each fusion variant with the same recipe,
budget and seed, then print the judged figures side by side, per run and (over several seeds) as
mean +- standard deviation.

    full        input-level condition + post-predictor cross-attention + raw-text injection
    input_only  the input-level (pooled) condition only
    late_only   cross-attention and injection, without the input-level condition
    none        unconditional (the caption never reaches the model)

On ``shapes`` (``--config shapes``, the default) the figures are joint accuracy on seen and held-out
color-shape combinations and on seen combinations named in words training never used
(``heldout_words``), FD, and the linear-probe accuracy of each frozen encoder. On ``pairs``
(``--config pairs``, composition) they are the objects, relation, axis and joint accuracy of the
pairs judge on seen and held-out bindings (docs/pairs.md).

    python benchmarks/bench_fusion.py                                       # shapes, every mode, seed 0
    python benchmarks/bench_fusion.py --seeds 0,1,2 --jobs 2                # two runs at a time, 1 thread each
    python benchmarks/bench_fusion.py --config pairs --modes full,input_only --seeds 0,1,2 --jobs 2
    python benchmarks/bench_fusion.py --steps 300 --modes full,late_only -- --device cuda

Each variant's run is ``<output_dir>/<config>/seed<S>/<mode>`` with its ``row.json``; ``--reuse``
reads back a row that is newer than its checkpoint, or evaluates the checkpoint again, instead of
training (after a change to the evaluation, or to add seeds to a table). The rows of every variant
asked for are also written to ``<output_dir>/<config>/bench_fusion.json``.

The budget is the recipe's own unless ``--steps`` is given: then ``--epochs`` epochs of
ceil(steps / epochs) batches, so the warmup and the cosine schedules complete. ``--jobs N`` trains N
variants at once, each in its own process with ``OMP_NUM_THREADS`` = cores / N (on a 2-core CPU two
one-thread runs do about 1.3x the images per second of one two-thread run; single-thread and
multi-thread runs do not round alike, so compare a table's rows at one setting). Arguments after
``--`` go to main_jepat.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_jepat  # noqa: E402
from models.jepat import FUSION_MODES  # noqa: E402

# what each built-in set's evaluation reports: the metrics.json parts a row keeps, and the figures
# of its tables as (part, key, column name)
PARTS = {"shapes": ("seen", "heldout", "heldout_words", "probe"), "pairs": ("pairs_seen", "pairs_heldout")}
FIGURES = {
    "shapes": (
        ("seen", "joint_acc", "seen joint"),
        ("heldout", "joint_acc", "held joint"),
        ("heldout_words", "joint_acc", "words joint"),
        ("heldout_words", "color_acc", "words color"),
        ("heldout_words", "shape_acc", "words shape"),
        ("seen", "fd", "FD seen"),
        ("probe", "shape_acc", "probe shape"),
    ),
    "pairs": (
        ("pairs_seen", "joint_acc", "seen joint"),
        ("pairs_seen", "objects_acc", "seen objects"),
        ("pairs_seen", "relation_acc", "seen relation"),
        ("pairs_seen", "axis_acc", "seen axis"),
        ("pairs_heldout", "joint_acc", "held joint"),
        ("pairs_heldout", "objects_acc", "held objects"),
        ("pairs_heldout", "relation_acc", "held relation"),
        ("pairs_heldout", "axis_acc", "held axis"),
    ),
}


def judged_args(a, kind: str) -> list:
    """main_jepat.py arguments for the evaluation every variant gets."""
    out = ["--eval_per_combo", str(a.eval_per_combo)]
    if kind == "shapes":
        out += ["--probe", "--probe_train", str(a.probe_train), "--probe_test", str(a.probe_test)]
    return out


def logged_train_seconds(folder: Path) -> float | None:
    """Training seconds of the run in ``folder`` up to its last logged step (train_log.json), for a
    row evaluated without the row its training wrote."""
    log = folder / "train_log.json"
    history = json.loads(log.read_text()) if log.is_file() else []
    return history[-1].get("elapsed_s") if history else None


def read_row(folder: Path) -> dict:
    """``folder/row.json``, its training seconds filled from the training log when it has none."""
    row = json.loads((folder / "row.json").read_text())
    if row.get("train_seconds") is None:
        row["train_seconds"] = logged_train_seconds(folder)
    if row.get("precision") is None:
        row["precision"] = trained_precision(folder)
    return row


def trained_precision(folder: Path) -> str | None:
    """The precision a run trained in, as resolved into its config.yaml (``auto`` is bf16 on a CPU
    with native bf16 and fp32 on one without, so the command line alone does not say)."""
    path = folder / "config.yaml"
    if not path.is_file():
        return None
    return OmegaConf.load(path).get("runtime", {}).get("precision")


def evaluated_after_training(folder: Path) -> bool:
    """Whether ``folder`` holds a row written after its checkpoint (what --reuse reads back)."""
    ckpt, done = folder / "checkpoint-last.pth", folder / "row.json"
    return done.is_file() and ckpt.is_file() and done.stat().st_mtime > ckpt.stat().st_mtime


def run_variant(a, rest: list, kind: str, mode: str, seed: int, folder: Path, budget: list) -> dict:
    """Train one variant (or, with --reuse, evaluate its existing checkpoint-last.pth) and return
    its row; the row is also written to ``folder/row.json``."""
    ckpt, done = folder / "checkpoint-last.pth", folder / "row.json"
    t0 = time.time()
    if a.reuse and evaluated_after_training(folder):
        row = read_row(folder)
        if "evaluated" in row:
            return row  # evaluated after its checkpoint was written
    if a.reuse and ckpt.is_file():
        args = ["--evaluate", "--resume", str(ckpt), "--seed", str(seed), "--output_dir", str(folder / "eval")]
        m = main_jepat.main(main_jepat.parse_args(rest + judged_args(a, kind) + args))
        m = {
            **m,
            "train_seconds": read_row(folder)["train_seconds"] if done.is_file() else logged_train_seconds(folder),
        }
    else:
        args = ["--fusion", mode, "--seed", str(seed), "--output_dir", str(folder), "--save_freq", "0"]
        m = main_jepat.main(main_jepat.parse_args(rest + judged_args(a, kind) + budget + args + ["--grid_freq", "0"]))
        if "stopped_by_signal" in m:
            raise SystemExit(f"the {mode} run was stopped by signal {m['stopped_by_signal']} at step {m['step']}")
    row = {
        "set": kind,
        "fusion": mode,
        "seed": seed,
        "steps": m["step"],
        "threads": int(os.environ.get("OMP_NUM_THREADS", "0")) or None,
        "precision": trained_precision(folder),
        "train_seconds": m["train_seconds"],
        "total_seconds": time.time() - t0,
        **{part: m[part] for part in PARTS[kind] if part in m},
        "evaluated": time.time(),
    }
    done.write_text(json.dumps(row, indent=2))
    return row


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_in_processes(jobs: list, parallel: int) -> None:
    """Run each (mode, seed, folder) as ``bench_fusion.py --variant MODE:SEED <these arguments>`` in
    its own process, ``parallel`` at a time, each with cores / parallel threads and its output in
    ``folder/bench.log``. Raises SystemExit naming every variant that failed, after the others end."""
    threads = max(1, usable_cores() // parallel)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    pending, running, failed = list(jobs), [], []
    print(f"{len(jobs)} variant(s), {parallel} at a time, {threads} thread(s) each", flush=True)
    try:
        while pending or running:
            while pending and len(running) < parallel:
                mode, seed, folder = pending.pop(0)
                folder.mkdir(parents=True, exist_ok=True)
                log = open(folder / "bench.log", "w")
                cmd = [sys.executable, os.path.abspath(__file__), "--variant", f"{mode}:{seed}", *sys.argv[1:]]
                proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
                running.append((proc, mode, seed, folder, log, time.time()))
                print(f"started {mode} seed {seed} (log {folder / 'bench.log'})", flush=True)
            time.sleep(1.0)
            for item in [r for r in running if r[0].poll() is not None]:
                proc, mode, seed, folder, log, started = item
                running.remove(item)
                log.close()
                state = "done" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                print(f"{state}: {mode} seed {seed} after {time.time() - started:.0f} s", flush=True)
                if proc.returncode != 0:
                    failed.append(f"{mode} seed {seed} (see {folder / 'bench.log'})")
    finally:
        for proc, *_ in running:  # interrupted: leave no orphan training runs behind
            proc.terminate()
    if failed:
        raise SystemExit("variants failed: " + "; ".join(failed))


def figure(row: dict, part: str, key: str) -> float:
    value = row.get(part, {}).get(key)
    return float("nan") if value is None else float(value)


def print_rows(rows: list, kind: str) -> None:
    names = [name for _, _, name in FIGURES[kind]]
    print(
        f"{'fusion':>10} {'seed':>4} {'steps':>5} {'train s':>7} {'prec':>4} | " + " | ".join(f"{n:>13}" for n in names)
    )
    for r in rows:
        cells = [f"{figure(r, part, key):13.3f}" for part, key, _ in FIGURES[kind]]
        seconds = r.get("train_seconds")
        seconds = f"{seconds:7.0f}" if seconds is not None else f"{'-':>7}"
        precision = r.get("precision") or "-"
        print(f"{r['fusion']:>10} {r['seed']:4d} {r['steps']:5d} {seconds} {precision:>4} | " + " | ".join(cells))
    mixed = sorted({str(r.get("precision")) for r in rows})
    if len(mixed) > 1:
        print(f"note: these runs trained in different precisions ({', '.join(mixed)}); compare rows of one precision")
    if kind == "shapes" and "probe" in rows[0]:
        base = rows[0]["probe"]
        print(
            f"probe baselines (seed {rows[0]['seed']}): random-init encoder color "
            f"{base['random_init_encoder']['color_acc']:.3f} shape {base['random_init_encoder']['shape_acc']:.3f}; "
            f"raw pixels color {base['raw_pixels']['color_acc']:.3f} shape {base['raw_pixels']['shape_acc']:.3f}"
        )


def summarize(rows: list, kind: str) -> None:
    """Mean and standard deviation over seeds of every figure, per fusion mode."""
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nover seeds {seeds}: mean +- standard deviation (n = seeds)")
    print(f"{'fusion':>10} {'n':>2} | " + " | ".join(f"{name:>15}" for _, _, name in FIGURES[kind]))
    for mode in dict.fromkeys(r["fusion"] for r in rows):
        mine = [r for r in rows if r["fusion"] == mode]
        cells = []
        for part, key, _ in FIGURES[kind]:
            v = np.array([figure(r, part, key) for r in mine], dtype=float)
            v = v[~np.isnan(v)]
            cells.append(f"{v.mean():7.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:5.3f}" if len(v) else f"{'-':>15}")
        print(f"{mode:>10} {len(mine):2d} | " + " | ".join(cells))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="shapes", help="a built-in set's recipe (configs/<name>.yaml): shapes or pairs")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per variant (default: the recipe's)")
    p.add_argument("--epochs", type=int, default=3, help="epochs a --steps budget is spread over")
    p.add_argument("--modes", default=",".join(FUSION_MODES), help=f"comma-separated subset of {FUSION_MODES}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds; each trains every mode")
    p.add_argument("--jobs", type=int, default=1, help="variants trained at once, each in its own process")
    p.add_argument(
        "--reuse",
        action="store_true",
        help="read back <run>/row.json when it is newer than the run's checkpoint-last.pth, else "
        "evaluate that checkpoint, instead of training",
    )
    p.add_argument("--eval_per_combo", type=int, default=16)
    p.add_argument("--probe_train", type=int, default=1000, help="shapes: linear-probe training images")
    p.add_argument("--probe_test", type=int, default=500, help="shapes: linear-probe test images")
    p.add_argument("--output_dir", default="output/bench_fusion")
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)  # MODE:SEED, one child of --jobs
    p.add_argument("rest", nargs="*", help="after --: extra main_jepat.py arguments")
    a = p.parse_args()
    rest = ["--config", a.config] + a.rest
    c = main_jepat.parse_args(rest).config
    kind = c.data.dataset
    if kind not in PARTS:
        raise SystemExit(f"bench_fusion judges the built-in sets {sorted(PARTS)}; --config {a.config} uses {kind!r}")
    budget, steps = [], c.optim.epochs * math.ceil(c.data.num_samples / c.optim.batch_size)
    if a.steps is not None:
        per_epoch = math.ceil(a.steps / a.epochs)
        budget = ["--epochs", str(a.epochs), "--num_samples", str(per_epoch * c.optim.batch_size)]
        steps = a.epochs * per_epoch
    modes = a.modes.split(",")
    for mode in modes:
        if mode not in FUSION_MODES:
            raise SystemExit(f"unknown fusion mode {mode!r}; choose from {FUSION_MODES}")
    seeds = [int(x) for x in a.seeds.split(",")]
    root = Path(a.output_dir) / a.config
    folder = {(mode, seed): root / f"seed{seed}" / mode for seed in seeds for mode in modes}
    if a.variant is not None:  # one child of --jobs: train and evaluate this variant, write its row
        mode, seed = a.variant.split(":")
        run_variant(a, rest, kind, mode, int(seed), folder[mode, int(seed)], budget)
        return
    rows = []
    if a.jobs > 1:
        todo = [(m, s, f) for (m, s), f in folder.items()]
        if a.reuse:  # rows already evaluated after their checkpoint need no process
            todo = [(m, s, f) for m, s, f in todo if not evaluated_after_training(f)]
        run_in_processes(todo, a.jobs)
        missing = [str(f) for f in folder.values() if not (f / "row.json").is_file()]
        if missing:
            raise SystemExit(f"no row.json in {missing}: run again with --reuse to evaluate them")
        rows = [read_row(f) for f in folder.values()]
    else:
        for (mode, seed), f in folder.items():
            rows.append(run_variant(a, rest, kind, mode, seed, f, budget))
            (root / "bench_fusion.json").write_text(json.dumps(rows, indent=2))  # after every variant
    (root / "bench_fusion.json").write_text(json.dumps(rows, indent=2))
    unit = "combination" if kind == "shapes" else "pair of objects"
    print(
        f"\nfusion ablation on {kind} ({a.config} recipe): {steps} steps of {c.optim.batch_size} images, "
        f"{a.eval_per_combo} judged images per {unit}"
    )
    print_rows(rows, kind)
    if len(seeds) > 1:
        summarize(rows, kind)


if __name__ == "__main__":
    main()
