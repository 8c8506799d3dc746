"""Every GPU-only path of the framework in one command, within about 10 minutes on one GPU.

Each check runs as its own process (a crash, a hang or a compile failure stops only that check)
and the script ends with one table: status, seconds, and the figure that matters, with the share
of the GPU's measured bf16 matmul rate where there is one. Run it through benchmarks/gpu_smoke.sh.

    checks                          what runs
    train base bf16 eager / compile benchmarks/bench_train.py: base preset, 256 tokens, the recipe's 32
                                    images per GPU, activation checkpointing, fused AdamW, another mask
                                    ratio every step; peak memory, host syncs per step (must be 0),
                                    recompiles (at most 2) and graph breaks (none)
    cache shapes + caption table    main_cache.py: 512 shapes images as latents, their captions embedded
    train from the cache            main_jepat.py on that cache: 2 loader workers, accumulation 2,
                                    activation checkpointing + compile; images/s, TFLOP/s, share of
                                    peak, the run's compile report
    DDP over NCCL, 1 process        torchrun main_jepat.py --strategy ddp on the shapes recipe, bf16
    FSDP2, 1 rank                   the same with --strategy fsdp, then a resume for 2 more steps
    huge under FSDP2, 1 rank        the huge preset sharded on one rank: one step, one timed sharded
                                    save (torch.distributed.checkpoint) of checkpoint-last.dcp
    sampling base bf16              benchmarks/bench_speed.py: the sampler variants at base, 64 iterations
    main_sample.py                  images from the DDP run's checkpoint
    evaluation, small extractor     torchrun --evaluate: prompts -> samples -> FID / IS with the registered
                                    offline extractor (jepat-test-tiny) against rendered shapes

``--device cpu`` runs the same paths at tiny sizes on the CPU (gloo instead of NCCL, fp32, no
compile): a rehearsal that catches a renamed flag or a broken path before device time is spent.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


class Check(NamedTuple):
    name: str
    argv: list[str]
    timeout: int
    figure: Callable[[Path, str], str]  # (output folder, combined log) -> the figure to print
    expect: tuple = ()  # strings the log must contain


def _json(path: Path):
    return json.loads(path.read_text())


MAX_RECOMPILES = 2  # per run: each compiled code object holds a static and a dynamic graph


def check_compile(report: dict | None) -> str:
    """The compile figure; raises (the check fails) on graph breaks or more recompiles than allowed."""
    if not report:
        return ""
    assert report["graph_breaks"] == 0, f"graph breaks: {report}"
    assert report["recompiles"] <= MAX_RECOMPILES, f"{report['recompiles']} recompiles: {report}"
    return f", {report['recompiles']} recompiles, 0 graph breaks"


def train_figure(out: Path) -> Callable[[Path, str], str]:
    def figure(_: Path, __: str) -> str:
        row = _json(out)[0]
        syncs = row["host_syncs_per_step"]
        assert not syncs, f"{syncs} host syncs per step"
        return (
            f"{row['images_per_s']:.1f} img/s, {100 * row['share_of_matmul']:.0f}% of the "
            f"{row['precision']} matmul rate ({row['matmul_TFLOPs']:.3g} TFLOP/s), peak {row['peak_mem_GiB']:.1f} GiB "
            f"at batch {row['batch']}, warm-up {row['warmup_s']:.0f} s, host syncs/step {syncs}"
            + check_compile(row.get("compile"))
        )

    return figure


def logged_compile(log: str) -> dict | None:
    """The ``torch.compile: {...}`` report main_jepat.py logs at the end of a compiled run."""
    lines = [line.split("torch.compile: ", 1)[1] for line in log.splitlines() if "torch.compile: {" in line]
    return json.loads(lines[-1]) if lines else None


def run_figure(run: Path) -> Callable[[Path, str], str]:
    def figure(_: Path, log: str) -> str:
        steps = _json(run / "train_log.json")
        assert (run / "checkpoint-last.pth").is_file(), "no checkpoint-last.pth"
        return f"{steps[-1]['step']} steps, last loss {steps[-1]['loss']:.3f}, checkpoint written"

    return figure


def throughput_figure(run: Path, compiled: bool) -> Callable[[Path, str], str]:
    def figure(_: Path, log: str) -> str:
        last = _json(run / "train_log.json")[-1]
        report = logged_compile(log)
        assert report or not compiled, "no torch.compile report in the log"
        return (
            f"{last['step']} steps, {last['images_per_s']:.1f} img/s, {last['tflops']:.3g} TFLOP/s = "
            f"{100 * last['mfu']:.1f}% of peak (flop_counter, once per run)" + check_compile(report)
        )

    return figure


def save_figure(run: Path) -> Callable[[Path, str], str]:
    def figure(_: Path, log: str) -> str:
        lines = log.splitlines()
        saved = [line.split("checkpoint-last.dcp: ", 1)[1] for line in lines if "checkpoint-last.dcp: " in line]
        sizes = [json.loads(line.split(": ", 2)[-1]) for line in lines if '"total"' in line and " model " in line]
        total = f"{sizes[-1]['total'] / 1e6:,.0f}M parameters; " if sizes else ""
        return f"{total}checkpoint-last.dcp: {saved[-1]}"

    return figure


def sample_figure(out: Path) -> Callable[[Path, str], str]:
    def figure(_: Path, __: str) -> str:
        rows = _json(out)["sample"]
        last = list(rows)[-1]
        return (
            "; ".join(f"{n.split(':')[0]} {r['seconds_per_image']:.3f} s/img" for n, r in rows.items())
            + f"; fastest {rows[last]['speedup']:.1f}x the published structure"
        )

    return figure


def eval_figure(path: Path) -> Callable[[Path, str], str]:
    def figure(_: Path, __: str) -> str:
        m = _json(path)
        f = m["fidelity"]
        return (
            f"{m['num_samples']} images at {m['seconds_per_image']:.3f} s/img; {f['fid_label']} {f['fid']:.2f}, "
            f"IS {f['inception_score_mean']:.2f} ({f['feature_extractor']})"
        )

    return figure


def checks(out: Path, device: str) -> list[Check]:
    gpu = device != "cpu"
    precision = "bf16" if gpu else "fp32"
    torchrun = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    backend = "nccl" if gpu else "gloo"
    train_shape = (
        # base at the recipe's 32 images per GPU and its activation checkpointing; another mask ratio
        # every step (the warm-up steps see the recompile to dynamic shapes)
        ["--presets", "base", "--batch_size", "32", "--seq_len", "256", "--steps", "10", "--warmup", "4"]
        if gpu
        else ["--presets", "tiny", "--batch_size", "4", "--seq_len", "16", "--steps", "1"]
    ) + ["--grad_checkpointing"]
    run = [
        "main_jepat.py",
        "--config",
        "shapes",
        "--device",
        device,
        "--precision",
        precision,
        "--num_samples",
        "512",
        "--epochs",
        "1",
        "--max_steps",
        "20" if gpu else "4",
        "--no_eval",
        "--save_freq",
        "0",
        "--grid_freq",
        "0",
        "--log_freq",
        "2",
    ]
    ddp, fsdp = out / "ddp", out / "fsdp"
    sample = (
        ["--preset", "base", "--sample_batch", "16", "--num_iter", "64", "--profile"]
        if gpu
        else ["--preset", "tiny", "--sample_batch", "4", "--num_iter", "4"]
    )
    prompts, ref = out / "prompts.txt", out / "reference"
    result = [
        Check(
            "train base bf16 eager" if gpu else "train tiny fp32 eager",
            [
                PY,
                "benchmarks/bench_train.py",
                *train_shape,
                "--precisions",
                precision,
                "--compile",
                "off",
                "--device",
                device,
                "--json",
                str(out / "train_eager.json"),
            ],
            300,
            train_figure(out / "train_eager.json"),
        ),
    ]
    if gpu:
        result.append(
            Check(
                "train base bf16 compile",
                [
                    PY,
                    "benchmarks/bench_train.py",
                    *train_shape,
                    "--precisions",
                    precision,
                    "--compile",
                    "on",
                    "--device",
                    device,
                    "--json",
                    str(out / "train_compile.json"),
                ],
                420,
                train_figure(out / "train_compile.json"),
            )
        )
    cache, cached = out / "cache", out / "cached"
    result += [
        Check(
            "cache shapes + caption table",
            [
                PY,
                "main_cache.py",
                "--config",
                "shapes",
                "--dataset",
                "shapes",
                "--cache_dir",
                str(cache),
                "--num_samples",
                "512",
                "--device",
                device,
                "--num_workers",
                "2",
            ],
            240,
            lambda _, __: "latents and caption embeddings cached",
            ("images seen 512 = cached 512",),
        ),  # fmt: skip
        Check(
            "train from the cache: 2 workers, accum 2, checkpointing" + (" + compile" if gpu else ""),
            [
                *torchrun,
                *run,
                "--dataset",
                "cached",
                "--data_path",
                str(cache),
                "--num_workers",
                "2",
                "--accum_iter",
                "2",
                "--grad_checkpointing",
                *(["--compile"] if gpu else []),
                "--output_dir",
                str(cached),
            ],
            420,
            throughput_figure(cached, gpu),
            ("caption embeddings of",),
        ),  # fmt: skip
        Check(
            f"DDP over {backend.upper()}, 1 process",
            [*torchrun, *run, "--strategy", "ddp", "--output_dir", str(ddp)],
            240,
            run_figure(ddp),
            (f"backend {backend}", f"AdamW fused={gpu}"),
        ),
        Check(
            "FSDP2, 1 rank",
            [*torchrun, *run, "--strategy", "fsdp", "--output_dir", str(fsdp)],
            240,
            run_figure(fsdp),
            (f"backend {backend}", "strategy fsdp"),
        ),
        Check(
            "FSDP2 resume",
            [
                *torchrun,
                *run,
                "--strategy",
                "fsdp",
                "--output_dir",
                str(fsdp),
                "--resume",
                str(fsdp / "checkpoint-last.pth"),
                "--max_steps",
                "22" if gpu else "6",
            ],
            240,
            run_figure(fsdp),
            ("resumed",),
        ),
        Check(
            f"{'huge' if gpu else 'tiny'} under FSDP2, 1 rank: a step and a timed save",
            [
                *torchrun,
                *run,
                "--strategy",
                "fsdp",
                "--model",
                "huge" if gpu else "tiny",
                "--grad_checkpointing",
                "--checkpoint_format",
                "sharded",
                "--max_steps",
                "1",
                "--output_dir",
                str(out / "huge"),
            ],
            420,
            save_figure(out / "huge"),
            ("checkpoint-last.dcp: ",),
        ),
        Check(
            f"sampling {'base bf16' if gpu else 'tiny fp32'}",
            [
                PY,
                "benchmarks/bench_speed.py",
                *sample,
                "--skip",
                "train",
                "--precision",
                precision,
                "--device",
                device,
                "--json",
                str(out / "sample.json"),
            ],
            300,
            sample_figure(out / "sample.json"),
        ),
        Check(
            "main_sample.py",
            [
                PY,
                "main_sample.py",
                "--checkpoint",
                str(ddp / "checkpoint-last.pth"),
                "--prompt",
                "a red circle",
                "--prompt",
                "a blue square",
                "--num_per_prompt",
                "4",
                "--device",
                device,
                "--precision",
                precision,
                "--out_dir",
                str(out / "samples"),
            ],
            180,
            lambda o, log: f"{len(list((out / 'samples').glob('0*.png')))} images",
        ),
        Check(
            "evaluation, small extractor",
            [
                *torchrun,
                "main_jepat.py",
                "--evaluate",
                "--resume",
                str(ddp / "checkpoint-last.pth"),
                "--device",
                device,
                "--precision",
                precision,
                "--eval_prompts_file",
                str(prompts),
                "--num_images",
                "64",
                "--eval_batch_size",
                "32",
                "--eval_metrics",
                "fid,isc",
                "--fid_feature_extractor",
                "jepat-test-tiny",
                "--fid_ref",
                str(ref),
                "--output_dir",
                str(out / "eval"),
            ],
            240,
            eval_figure(out / "eval" / "metrics.json"),
        ),
    ]
    return result


def prepare_inputs(out: Path) -> None:
    """Prompts and a folder of rendered reference images for the evaluation check."""
    sys.path.insert(0, str(ROOT))
    from PIL import Image

    from util.data import shapes

    (out / "prompts.txt").write_text("\n".join(shapes.prompt(c, s) for c, s in shapes.SEEN_COMBOS) + "\n")
    ref = out / "reference"
    ref.mkdir(parents=True, exist_ok=True)
    targets = [c for c in shapes.SEEN_COMBOS for _ in range(8)]
    for i, im in enumerate(shapes.render_fresh(targets, 24, seed=0)):
        Image.fromarray(im).save(ref / f"{i:04d}.png")


def run_check(check: Check, out: Path) -> dict:
    t0 = time.time()
    log_path = out / "logs" / (check.name.replace(" ", "_").replace(",", "").replace("/", "_") + ".log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.run(
            check.argv,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=check.timeout,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log, code = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        log, code = f"{e.stdout or ''}{e.stderr or ''}\ntimed out after {check.timeout} s", None
    log = log if isinstance(log, str) else log.decode(errors="replace")
    log_path.write_text(" ".join(check.argv) + "\n\n" + log)
    seconds = time.time() - t0
    status, figure = "ok", ""
    missing = [s for s in check.expect if s not in log]
    if code != 0:
        status, figure = ("timeout" if code is None else f"exit {code}"), _last_error(log)
    elif missing:
        status, figure = "FAIL", f"the log lacks {missing}"
    else:
        try:
            figure = check.figure(out, log)
        except Exception as e:  # a figure that cannot be read is a failure
            status, figure = "FAIL", f"{type(e).__name__}: {e}"
    return {"check": check.name, "status": status, "seconds": seconds, "figure": figure, "log": str(log_path)}


def _last_error(log: str) -> str:
    lines = [line for line in log.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "(no output)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (the smoke test) or cpu (a rehearsal at tiny sizes)")
    p.add_argument("--out", default="output/gpu_smoke", help="logs, runs and smoke.json go here")
    p.add_argument("--only", default="", help="comma list of check-name prefixes to run")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    prepare_inputs(out)
    selected = [c for c in checks(out, a.device) if not a.only or any(c.name.startswith(x) for x in a.only.split(","))]
    rows = []
    for check in selected:
        print(f"[smoke] {check.name} ...", flush=True)
        rows.append(run_check(check, out))
        print(f"[smoke]   {rows[-1]['status']} in {rows[-1]['seconds']:.0f} s: {rows[-1]['figure']}", flush=True)
    (out / "smoke.json").write_text(json.dumps(rows, indent=1))
    width = max(len(r["check"]) for r in rows)
    print(f"\n{'check':{width}s}  {'status':7s} {'s':>5s}  figure")
    for r in rows:
        print(f"{r['check']:{width}s}  {r['status']:7s} {r['seconds']:5.0f}  {r['figure']}")
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} checks passed; logs in {out / 'logs'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
