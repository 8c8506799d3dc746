"""benchmarks/bench_fusion.py: rows already evaluated are read back (--reuse) without starting a
run, and the tables hold each set's own figures, per run and as mean +- sd over seeds."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_fusion", ROOT / "benchmarks" / "bench_fusion.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairs_row(mode: str, seed: int, joint: float) -> dict:
    part = dict(joint_acc=joint, objects_acc=joint + 0.1, relation_acc=0.5, n=144)
    row = dict(set="pairs", fusion=mode, seed=seed, steps=3000, train_seconds=600.0)
    return {**row, "pairs_seen": part, "pairs_heldout": part}


def test_reuse_reads_rows_back_and_summarizes_over_seeds(bench, tmp_path, monkeypatch, capsys):
    joint = {("full", 0): 0.5, ("full", 1): 0.7, ("input_only", 0): 0.1, ("input_only", 1): 0.3}
    for (mode, seed), value in joint.items():
        run = tmp_path / "pairs" / f"seed{seed}" / mode
        run.mkdir(parents=True)
        (run / "checkpoint-last.pth").write_bytes(b"")
        past = time.time() - 60
        os.utime(run / "checkpoint-last.pth", (past, past))  # the row was evaluated after it
        (run / "row.json").write_text(json.dumps({**_pairs_row(mode, seed, value), "evaluated": time.time()}))
        # rows written before rows recorded the precision take it from the run's resolved config
        precision = "bf16" if (mode, seed) == ("input_only", 0) else "fp32"
        (run / "config.yaml").write_text(f"runtime:\n  precision: {precision}\n")
    # a row evaluated apart from its training takes the training seconds from the training log
    late = tmp_path / "pairs" / "seed1" / "input_only"
    (late / "row.json").write_text(json.dumps({**_pairs_row("input_only", 1, 0.3), "train_seconds": None}))
    (late / "train_log.json").write_text(
        json.dumps([{"step": 50, "elapsed_s": 7.0}, {"step": 100, "elapsed_s": 1234.0}])
    )

    def no_process(*args, **kwargs):
        raise AssertionError("an evaluated row must not start a run")

    monkeypatch.setattr(bench.subprocess, "Popen", no_process)
    argv = ["bench_fusion.py", "--config", "pairs", "--modes", "full,input_only", "--seeds", "0,1"]
    monkeypatch.setattr(sys, "argv", argv + ["--jobs", "2", "--reuse", "--output_dir", str(tmp_path)])
    bench.main()
    out = capsys.readouterr().out
    assert "fusion ablation on pairs" in out and "seen relation" in out and "words joint" not in out
    summary = out.split("over seeds [0, 1]")[1]
    full = next(line for line in summary.splitlines() if line.strip().startswith("full"))
    assert "0.600 +- 0.141" in full  # (0.5, 0.7): mean 0.6, sample sd 0.141
    assert "0.700 +- 0.141" in full  # objects: joint + 0.1
    assert out.count(" 600 fp32 |") == 2 and " 600 bf16 |" in out and " 1234 fp32 |" in out
    assert "trained in different precisions (bf16, fp32)" in out
    rows = json.loads((tmp_path / "pairs" / "bench_fusion.json").read_text())
    assert [(r["fusion"], r["seed"]) for r in rows] == [("full", 0), ("input_only", 0), ("full", 1), ("input_only", 1)]


def test_only_the_built_in_sets_and_known_modes(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench_fusion.py", "--config", "imagenet-base"])
    with pytest.raises(SystemExit, match="built-in sets"):
        bench.main()
    monkeypatch.setattr(sys, "argv", ["bench_fusion.py", "--modes", "full,early"])
    with pytest.raises(SystemExit, match="unknown fusion mode 'early'"):
        bench.main()
