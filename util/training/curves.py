"""``curves.png``: a run at a glance, written at the end of training (rank 0) from the run folder:
the losses and the learning rate of ``train_log.json`` and the evaluation figures of every
``metrics.json`` (the final one and the ``eval-epoch*`` ones) against optimizer steps.

Drawn with matplotlib's object API on the Agg canvas: no pyplot, no global backend, no window.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from util.evaluation.evaluate import metric_scalars

log = logging.getLogger(__name__)

LOSSES = ("loss", "flow_loss", "jepa_loss")
Series = dict[str, list[tuple[int, float]]]


def evaluation_series(run_dir: Path) -> Series:
    """Every evaluation figure of the run folder's metrics.json files, as (step, value) sorted by step."""
    files = [run_dir / "metrics.json"] + sorted(run_dir.glob("eval-epoch*/metrics.json"))
    series: Series = {}
    for f in files:
        if not f.is_file():
            continue
        metrics = json.loads(f.read_text())
        for tag, value in metric_scalars(metrics).items():
            series.setdefault(tag.removeprefix("eval/"), []).append((int(metrics.get("step", 0)), float(value)))
    return {k: sorted(set(v)) for k, v in sorted(series.items())}


def _panels(history: list[dict], evals: Series) -> list[tuple[str, Series, bool]]:
    """(title, {label: points}, log y) of each panel: losses, learning rate, the figures in [0,1]
    together, then one panel for each other figure (FID, IS, CLIP score)."""
    panels = [
        ("losses", {k: [(r["step"], r[k]) for r in history if k in r] for k in LOSSES}, True),
        ("learning rate", {"lr": [(r["step"], r["lr"]) for r in history if "lr" in r]}, False),
    ]
    unit = {k: v for k, v in evals.items() if all(0.0 <= y <= 1.0 for _, y in v)}
    if unit:
        panels.append(("evaluation", unit, False))
    panels += [(k, {k: v}, False) for k, v in evals.items() if k not in unit]
    return [p for p in panels if any(p[1].values())]


def plot_curves(history: list[dict], evals: Series, path: Path, title: str = "") -> Path:
    """Draw the panels of ``history`` (train_log.json rows) and ``evals`` into the PNG ``path``."""
    panels = _panels(history, evals)
    if not panels:
        raise ValueError("nothing to plot: no logged steps and no evaluation figures")
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    last_step = max(x for _, series, _ in panels for pts in series.values() for x, _ in pts)
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # imported when drawn, not by every process
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    for i, (name, series, log_y) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for j, (label, points) in enumerate(series.items()):
            if points:
                xs, ys = zip(*points)
                few = len(xs) < 8  # evaluations: markers, and the last value in the legend
                ax.plot(
                    xs,
                    ys,
                    marker="osD^v<>p"[j % 8] if few else None,
                    markersize=5,
                    linewidth=1.2,
                    label=f"{label} ({ys[-1]:.3g})" if few else label,
                    alpha=0.85,
                )
        if log_y and all(y > 0 for pts in series.values() for _, y in pts):
            ax.set_yscale("log")
        if name == "evaluation":
            ax.set_ylim(-0.03, 1.03)
        ax.set_xlim(0, last_step * 1.04 + 1)  # every panel spans the whole run
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=8)
        if len(series) > 1:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_curves(run_dir: Path, title: str = "") -> Path | None:
    """``run_dir/curves.png`` from its train_log.json and metrics.json files (None: nothing logged)."""
    run_dir = Path(run_dir)
    log_file = run_dir / "train_log.json"
    history = json.loads(log_file.read_text()) if log_file.is_file() else []
    evals = evaluation_series(run_dir)
    if not history and not evals:
        log.info("no curves.png: %s holds no logged steps and no evaluation", run_dir)
        return None
    path = plot_curves(history, evals, run_dir / "curves.png", title)
    log.info("wrote %s", path)
    return path
