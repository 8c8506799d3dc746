"""Training throughput of one process: images/s, tokens/s, peak memory and achieved FLOP/s as a
share of this device's measured matmul rate, per preset x precision x torch.compile.

    python benchmarks/bench_train.py                                  # short CPU-sized default
    python benchmarks/bench_train.py --presets base --precisions bf16 --compile off,on \\
        --batch_size 64 --seq_len 256 --token_dim 16 --steps 20      # the published base shape, on a GPU

A step is what engine_jepat.train does, through the same ``Parallel`` (compile per block before
activation checkpointing): autocast forward of the loss (models/loss.py) (flow + JEPA against
the EMA), backward, grad clip, AdamW (fused on GPUs), EMA update. The caption embeddings are
random (CLIP ViT-L-14 widths), so no text encoder runs. Each step draws another mask ratio, as
training does (``--no-vary_seeds``: one), so the recompile count printed is the one a run sees.
FLOPs come from torch.utils.flop_counter over the timed steps' seeds run eagerly (matmuls and
attention, forward and backward); host syncs are counted over one eager step with a dispatch mode.
The matmul rate is the best of a few square matmuls in the step's dtype. Each configuration runs in its own
process (clean peak memory, no compile cache shared). This prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from engine_jepat import param_groups, update_ema  # noqa: E402
from models.jepat import build_model  # noqa: E402
from models.loss import JEPATLoss  # noqa: E402
from models.text_encoders import TextEmbeddings  # noqa: E402
from util.runtime import DistEnv, autocast_context, init_runtime, resolve_precision  # noqa: E402
from util.training.parallel import Parallel, compile_report, seed_step  # noqa: E402
from util.training.throughput import HostSyncs, count_flops, matmul_rate  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T training benchmark", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--presets", default="tiny,base")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--compile", default="off,on", help="off, on, or both")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--seq_len", type=int, default=16, help="image tokens (published: 256)")
    p.add_argument("--token_dim", type=int, default=16, help="latent channels x patch^2 (KL-16, patch 1: 16)")
    p.add_argument("--buffer_size", type=int, default=None, help="buffer tokens (default: the preset's)")
    p.add_argument("--text_len", type=int, default=16, help="caption tokens")
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--grad_checkpointing", action="store_true", help="recompute the blocks' activations")
    p.add_argument(
        "--vary_seeds", action=argparse.BooleanOptionalAction, default=True,
        help="another seed (mask ratio) every step, as in training; off: one seed, one graph",
    )  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="untimed steps (compilation happens here)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # preset,precision,compile: run in this process
    return p


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_one(args: argparse.Namespace, preset: str, precision: str, compiled: bool) -> dict:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    torch.manual_seed(0)
    kw = dict(token_dim=args.token_dim, seq_len=args.seq_len, text_token_dim=768, text_pooled_dim=768)
    if args.buffer_size is not None:
        kw["buffer_size"] = args.buffer_size
    model = build_model(preset, **kw).to(device)
    ema = build_model(preset, **kw).to(device).requires_grad_(False).eval()
    ema.load_state_dict(model.state_dict())
    model.train()
    B = args.batch_size
    x = torch.randn(B, args.seq_len, args.token_dim, device=device)
    mask = torch.ones(B, args.text_len, dtype=torch.bool, device=device)
    text = TextEmbeddings(torch.randn(B, args.text_len, 768, device=device), mask, torch.randn(B, 768, device=device))
    opt = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    backend = "inductor" if compiled else None
    p = Parallel(DistEnv(device=device), model, ema, JEPATLoss(), "ddp", precision, args.grad_checkpointing, backend)
    host = torch.Generator()

    def step(i: int) -> None:
        seed_step(0, i if args.vary_seeds else 0, 0, host)  # another mask ratio each step (or the same)
        with autocast_context(device, precision):
            out = p.train_module(x, text, host)
        opt.zero_grad(set_to_none=True)
        p.backward(out["loss"])
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        opt.step()
        update_ema(ema, model, 0.9999)

    timed = range(args.warmup, args.warmup + args.steps)
    with torch.compiler.set_stance("force_eager"):
        # FLOPs of the timed steps (they differ with the mask ratio), in eager mode
        flops = sum(count_flops(lambda i=i: step(i)) for i in timed) / len(timed)
        syncs = HostSyncs(device.type)
        with syncs:  # eager too: a dispatch mode would make dynamo retrace
            step(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(args.warmup):
        step(i)
    sync(device)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in timed:
        step(i)
    sync(device)
    step_s = (time.perf_counter() - t0) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        name = torch.cuda.get_device_name(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS
        name = f"CPU ({torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    rate = matmul_rate(device, dtype, 4096 if device.type == "cuda" else 1024)
    return {
        "preset": preset,
        "precision": precision,
        "compiled": compiled,
        "device": name,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
        "batch": B,
        "tokens_per_image": args.seq_len,
        "step_s": step_s,
        "warmup_s": warmup_s,
        "images_per_s": B / step_s,
        "tokens_per_s": B * args.seq_len / step_s,
        "peak_mem_GiB": peak / 2**30,
        "step_GFLOP": flops / 1e9,
        "achieved_TFLOPs": flops / step_s / 1e12,
        "matmul_TFLOPs": rate / 1e12,
        "share_of_matmul": flops / step_s / rate,
        "grad_checkpointing": args.grad_checkpointing,
        "host_syncs_per_step": syncs.count if device.type == "cuda" else None,  # every read is one on the CPU
        **({"compile": compile_report(p.compiled)} if compiled else {}),
    }


def check_auto_precision(rows: list[dict], device: str) -> None:
    """Whether ``--precision auto`` picks the faster of fp32 and bf16 for every measured pair."""
    auto = resolve_precision(init_runtime(device).device, "auto")
    for preset in dict.fromkeys(r["preset"] for r in rows):
        for compiled in (False, True):
            speed = {
                r["precision"]: r["images_per_s"] for r in rows if r["preset"] == preset and r["compiled"] == compiled
            }
            if {"fp32", "bf16"} <= set(speed):
                best = max(("fp32", "bf16"), key=speed.get)
                print(
                    f"--precision auto picks {auto} here; {preset} compile={'on' if compiled else 'off'}: fp32 "
                    f"{speed['fp32']:.2f} img/s, bf16 {speed['bf16']:.2f} img/s: auto is "
                    f"{'the faster' if auto == best else 'THE SLOWER'} ({speed[best] / speed[auto]:.2f}x)"
                )


def main(args: argparse.Namespace) -> list[dict]:
    if args.one:
        preset, precision, compiled = args.one.split(",")
        print(json.dumps(run_one(args, preset, precision, compiled == "on")))
        return []
    rows = []
    passthrough = [a for a in sys.argv[1:]]
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            for compiled in args.compile.split(","):
                cmd = [sys.executable, __file__, *passthrough, "--one", f"{preset},{precision},{compiled}"]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
                lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
                if out.returncode != 0 or not lines:
                    print(f"{preset} {precision} compile={compiled}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = json.loads(lines[-1])
                rows.append(row)
                print(
                    f"{row['preset']:>5} {row['precision']:>4} compile={'on ' if row['compiled'] else 'off'} "
                    f"{row['images_per_s']:9.2f} img/s {row['tokens_per_s']:10.1f} tok/s "
                    f"peak {row['peak_mem_GiB']:6.2f} GiB  {row['achieved_TFLOPs'] * 1e3:8.1f} GFLOP/s "
                    f"= {100 * row['share_of_matmul']:5.1f}% of matmul {row['matmul_TFLOPs'] * 1e3:.0f} GFLOP/s  "
                    f"(step {row['step_s']:.3f} s, warm-up {row['warmup_s']:.1f} s), "
                    f"host syncs/step {row['host_syncs_per_step']}"
                    + (f", compile {json.dumps(row['compile'])}" if row["compiled"] else ""),
                    flush=True,
                )
    if rows:
        print(
            f"device: {rows[0]['device']}; batch {args.batch_size}, {args.seq_len} tokens/image, "
            f"{args.steps} timed steps"
        )
        check_auto_precision(rows, args.device)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
