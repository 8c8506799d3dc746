"""Peak host memory of writing and reading a full training checkpoint (model, EMA, AdamW state) of
a preset, each step in a process of its own so that its peak RSS is its own:

    python benchmarks/checkpoint_memory.py --preset large --dir /tmp     # writes a ~11 GB file

save          build the model and EMA, give AdamW its two moments, write the checkpoint
load          torch.load(weights_only=True), the whole file copied into process memory
load_mmap     the same, memory-mapped (what util/training/checkpoint.py does)
resume_mmap   memory-mapped load plus copying model and EMA into a freshly built model

``--fsdp_ranks N`` instead compares the two ways N gloo ranks under FSDP2 save (one process per
rank, forked): ``plain`` gathers the full state on rank 0 and writes one file, ``sharded`` has every
rank write its shards with torch.distributed.checkpoint. Per rank: peak RSS before the save (the
sharded model and AdamW state) and after it.

It prints; it asserts nothing. The files are removed at the end.
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


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(preset: str):
    import torch

    from models.jepat import build_model

    torch.manual_seed(0)
    return build_model(preset, token_dim=16, seq_len=256, text_token_dim=512, text_pooled_dim=512)


def child(step: str, preset: str, path: str) -> dict:
    import torch

    from models.safe_load import load_torch_file, numpy_array_globals
    from util.training.checkpoint import save_checkpoint

    t = time.perf_counter()
    if step == "save":
        model = build(preset)
        ema = build(preset).requires_grad_(False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        for p in model.parameters():
            p.grad = None
        save_checkpoint(path, {"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                               "model_config": {"preset": preset}})  # fmt: skip
    elif step in ("load", "load_mmap", "resume_mmap"):
        if step == "load":
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
        else:
            state = load_torch_file(path, "checkpoint", allowed=numpy_array_globals())
        if step == "resume_mmap":
            model, ema = build(preset), build(preset)
            model.load_state_dict(state["model"])
            ema.load_state_dict(state["ema"])
        del state
    return {"step": step, "seconds": time.perf_counter() - t, "peak_rss_GiB": peak_gib()}


def _fsdp_rank(rank: int, world: int, store: str, preset: str, folder: str, sharded: bool, out: str) -> None:
    import torch
    import torch.distributed as dist

    from models.loss import JEPATLoss
    from util.runtime import DistEnv
    from util.training.checkpoint import CheckpointPolicy, TrainingCheckpoint, TrainState
    from util.training.parallel import Parallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    env = DistEnv(rank=rank, world_size=world, initialized=True)
    model, ema = build(preset), build(preset).requires_grad_(False)
    parallel = Parallel(env, model, ema, JEPATLoss(), "fsdp", "fp32")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    import gc

    gc.collect()
    before = peak_gib()
    record = {"model_config": {"preset": preset}}
    ckpt = TrainingCheckpoint(Path(folder), parallel, opt, TrainState(), record, CheckpointPolicy(), sharded=sharded)
    t = time.perf_counter()
    ckpt.save("last")
    seconds = time.perf_counter() - t
    Path(out, f"rank{rank}.json").write_text(json.dumps({"before": before, "after": peak_gib(), "seconds": seconds}))
    dist.destroy_process_group()


def fsdp_saves(preset: str, world: int, folder: Path, formats: list[str]) -> None:
    import shutil
    import tempfile

    import torch.multiprocessing as mp

    for sharded in [f == "sharded" for f in formats]:
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            args = (world, f"{tmp}/store", preset, tmp, sharded, tmp)
            mp.start_processes(_fsdp_rank, args=args, nprocs=world, join=True, start_method="fork")
            rows = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(world)]
            saved = Path(tmp, "checkpoint-last.dcp" if sharded else "checkpoint-last.pth")
            size = sum(f.stat().st_size for f in saved.iterdir()) if sharded else saved.stat().st_size
            peaks = ", ".join(f"rank {r}: {row['before']:.2f} -> {row['after']:.2f} GiB" for r, row in enumerate(rows))
            kind, seconds = "sharded" if sharded else "plain  ", max(r["seconds"] for r in rows)
            print(f"{preset} FSDP x{world} {kind} save: {size / 2**30:.2f} GiB on disk in {seconds:.1f} s; "
                  f"peak RSS before -> after the save: {peaks}")  # fmt: skip
            shutil.rmtree(saved, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(__doc__)
    p.add_argument("--preset", default="large")
    p.add_argument("--dir", default="/tmp")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--fsdp_ranks", type=int, default=0, help="compare plain and sharded FSDP saves on N gloo ranks")
    p.add_argument("--formats", default="plain,sharded", help="with --fsdp_ranks: which saves to run")
    a = p.parse_args()
    if a.fsdp_ranks:
        fsdp_saves(a.preset, a.fsdp_ranks, Path(a.dir), a.formats.split(","))
        return
    path = str(Path(a.dir) / f"checkpoint-memory-{a.preset}.pth")
    if a.child:
        print(json.dumps(child(a.child, a.preset, path)))
        return
    try:
        for step in ("save", "load", "load_mmap", "resume_mmap"):
            out = subprocess.run([sys.executable, __file__, "--preset", a.preset, "--dir", a.dir, "--child", step],
                                 cwd=ROOT, capture_output=True, text=True, check=True)  # fmt: skip
            row = json.loads(out.stdout.strip().splitlines()[-1])
            size = os.path.getsize(path) / 2**30
            print(f"{a.preset:6s} {step:12s} file {size:6.2f} GiB  peak RSS {row['peak_rss_GiB']:6.2f} GiB  "
                  f"{row['seconds']:6.1f} s")  # fmt: skip
    finally:
        Path(path).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
