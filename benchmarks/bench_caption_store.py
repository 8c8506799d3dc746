"""Caption embeddings at scale: memory and lookup rate of the caption store at 10k, 100k and 1M
unique captions, for the former design (every caption's token states in one in-memory table that
is re-concatenated as it grows) and the current one (the latent cache's caption table on disk,
memory-mapped, read per batch by row id).

    python benchmarks/bench_caption_store.py                       # 10k, 100k, 1M; MiniLM shapes
    python benchmarks/bench_caption_store.py --sizes 10000 --tokens 77 --token_dim 768 --pooled_dim 768   # CLIP-L

A stand-in encoder with the real output shapes (random values) replaces the text encoder, so the
figures are the store's own. Each size runs in its own process; memory is the process's anonymous
resident memory (``RssAnon``: what the process allocates, not the file pages the kernel caches
for a memory map) above the baseline after imports, sampled during the run. Lookups are training
batches of random row ids (the current design) or of caption strings (the former one).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from models.text_encoders import TextEmbeddings, TextEncoder  # noqa: E402
from util.data.caption_table import CaptionTable, write_caption_table  # noqa: E402
from util.data.captions import CaptionStore  # noqa: E402


class StandIn(TextEncoder):
    """Random embeddings of a real encoder's shapes (tokens [B,S,Dt], mask [B,S], pooled [B,Du])."""

    name = "stand-in"

    def __init__(self, tokens: int, token_dim: int, pooled_dim: int) -> None:
        super().__init__()
        self.max_length, self.token_dim, self.pooled_dim = tokens, token_dim, pooled_dim
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def _encode(self, prompts):
        B = len(prompts)
        mask = torch.arange(self.max_length)[None] < torch.randint(1, self.max_length + 1, (B, 1))
        return TextEmbeddings(torch.randn(B, self.max_length, self.token_dim), mask, torch.randn(B, self.pooled_dim))


def rss_anon_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class PeakMemory:
    """Samples RssAnon every 20 ms in a thread; ``peak`` is the largest value seen."""

    def __init__(self) -> None:
        self.peak, self._stop = rss_anon_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon_mb())
            time.sleep(0.02)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon_mb())


def former(n: int, enc: StandIn, batch: int, lookups: int) -> dict:
    """The former store: caption -> row dict, one table grown by concatenation (256 captions a part)."""
    captions = [f"caption number {i}" for i in range(n)]
    base = rss_anon_mb()
    with PeakMemory() as mem:
        t0 = time.perf_counter()
        index = {c: i for i, c in enumerate(captions)}
        parts = [enc.encode(captions[i : i + 256]) for i in range(0, n, 256)]
        table = TextEmbeddings.cat(parts)
        del parts
        build = time.perf_counter() - t0
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(lookups):
            ids = torch.randint(n, (batch,), generator=g).tolist()
            table[torch.tensor([index[captions[i]] for i in ids])]
        rate = lookups * batch / (time.perf_counter() - t0)
    return {"peak_mb": mem.peak - base, "build_s": build, "lookups_per_s": rate}


def current(n: int, enc: StandIn, batch: int, lookups: int, folder: Path) -> dict:
    """The current store: the caption table on disk, then training lookups by row id."""
    captions = [f"caption number {i}" for i in range(n)]
    base = rss_anon_mb()
    with PeakMemory() as write_mem:
        t0 = time.perf_counter()
        write_caption_table(folder, captions, enc, batch_size=1024)
        build = time.perf_counter() - t0
    del captions
    base_read = rss_anon_mb()
    with PeakMemory() as mem:
        store = CaptionStore(
            None,
            info={
                "name": enc.name,
                "token_dim": enc.token_dim,
                "pooled_dim": enc.pooled_dim,
                "max_length": enc.max_length,
            },
            table=CaptionTable(folder),
        )
        g = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(lookups):
            store.lookup(torch.randint(n, (batch,), generator=g))
        rate = lookups * batch / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        found = store.table.find([f"caption number {i}" for i in range(0, n, max(1, n // 256))])
        find_rate = len(found) / (time.perf_counter() - t0)
    disk = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
    return {
        "peak_mb": mem.peak - base_read,
        "write_peak_mb": write_mem.peak - base,
        "build_s": build,
        "lookups_per_s": rate,
        "find_per_s": find_rate,
        "disk_mb": disk,
        "found_all": bool((found >= 0).all()),
    }


def child(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    enc = StandIn(a.tokens, a.token_dim, a.pooled_dim)
    if a.design == "former":
        out = former(a.size, enc, a.batch, a.lookups)
    else:
        folder = Path(tempfile.mkdtemp(prefix="caption_table_", dir=a.tmp))
        try:
            out = current(a.size, enc, a.batch, a.lookups, folder)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--tokens", type=int, default=16, help="caption tokens S (MiniLM at the CPU recipe: 16)")
    p.add_argument("--token_dim", type=int, default=384)
    p.add_argument("--pooled_dim", type=int, default=384)
    p.add_argument("--batch", type=int, default=256, help="captions per training batch")
    p.add_argument("--lookups", type=int, default=200, help="batches looked up per measurement")
    p.add_argument(
        "--former_max",
        type=int,
        default=100_000,
        help="largest size run with the former design (it holds everything in memory)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tmp", default=None, help="folder for the tables (default: the system's temp folder)")
    p.add_argument("--design", choices=("former", "current"), help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.design:
        return child(a)
    per_caption = (a.tokens * a.token_dim * 4 + a.tokens + a.pooled_dim * 4) / 2**20
    print(
        f"caption store, {a.tokens} tokens x {a.token_dim} + pooled {a.pooled_dim}; batches of {a.batch}; "
        f"{torch.get_num_threads()} threads; memory = anonymous RSS above the baseline"
    )
    print(
        f"{'captions':>9} | {'former MB':>9} {'lookups/s':>10} | {'current MB':>10} {'lookups/s':>10} "
        f"{'write s':>8} {'disk MB':>8} {'writing MB':>10}"
    )
    for n in (int(s) for s in a.sizes.split(",")):
        rows = {}
        for design in ("former", "current"):
            if design == "former" and n > a.former_max:
                rows[design] = None
                continue
            cmd = [
                sys.executable,
                __file__,
                "--design",
                design,
                "--size",
                str(n),
                "--tokens",
                str(a.tokens),
                "--token_dim",
                str(a.token_dim),
                "--pooled_dim",
                str(a.pooled_dim),
                "--batch",
                str(a.batch),
                "--lookups",
                str(a.lookups),
                "--threads",
                str(a.threads),
            ] + (["--tmp", a.tmp] if a.tmp else [])
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
            if out.returncode:
                raise SystemExit(f"{design} at {n} failed:\n{out.stderr[-2000:]}")
            rows[design] = json.loads(out.stdout.strip().splitlines()[-1])
        f, c = rows["former"], rows["current"]
        former_cols = (
            f"{f['peak_mb']:9.0f} {f['lookups_per_s']:10.0f}"
            if f
            else f"{'~' + format(per_caption * n * 2, '.0f'):>9} {'not run':>10}"
        )
        print(
            f"{n:9d} | {former_cols} | {c['peak_mb']:10.1f} {c['lookups_per_s']:10.0f} {c['build_s']:8.1f} "
            f"{c['disk_mb']:8.0f} {c['write_peak_mb']:10.1f}",
            flush=True,
        )
    print("former MB with ~: not run; the table and its concatenation copy at float32 (2 x per caption x count).")


if __name__ == "__main__":
    main()
