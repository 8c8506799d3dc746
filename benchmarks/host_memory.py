"""Host memory of training against the size of its latent cache: is it flat in the number of items?

For each size N this writes a latent cache of N captioned items (random 16 px images through the
``pixels`` tokenizer, one caption of its own per item, as in a caption dataset) with its caption
table (stand-in embeddings of a small width: the table is memory-mapped, its width does not
change what is held per item), then trains the tiny model on it for a few steps in a subprocess
with ``--num_workers 2`` and samples the memory of that process and its loader workers every
20 ms: the peak of their summed RSS, and of their summed PSS (shared pages counted once, so a
forked worker's copy-on-write pages count only when written). The slope between sizes is the
host memory each item costs. Anonymous memory (the heap: what a process holds per item) is
reported apart from mapped cache files (the memory-mapped shards and caption table: page cache,
clean, given back under pressure, growing with what the steps read and not with the cache's size).
It prints a table; it asserts nothing.

    python benchmarks/host_memory.py                      # 1k, 30k and 300k items
    python benchmarks/host_memory.py --sizes 1000,30000   # quicker
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from main_cache import tokenizer_meta  # noqa: E402
from models.text_encoders import TextEmbeddings  # noqa: E402
from models.tokenizers import build_tokenizer  # noqa: E402
from util.data.caption_table import write_caption_table  # noqa: E402
from util.data.captions import text_cache_key  # noqa: E402
from util.data.image_folders import CaptionOrigin  # noqa: E402
from util.data.latent_cache import cache_shard, finalize_cache, num_shards, prepare_cache  # noqa: E402

TEXT_LENGTH = 16


class SyntheticCaptions:
    """N items, each a random image with a caption of its own (the source interface of main_cache)."""

    def __init__(self, n: int, size: int) -> None:
        self.size = size
        self.kind, self.root = "caption", f"synthetic({n})"
        self.vocabulary = [
            f"photo {i}: a {('red', 'blue', 'green')[i % 3]} object number {i} on a table" for i in range(n)
        ]
        self.groups = [[c] for c in self.vocabulary]
        self.paths = [f"synthetic/{i:07d}.png" for i in range(n)]
        self.entry_groups = list(range(n))
        self.listing_skipped: list[dict] = []
        self.caption_origin = CaptionOrigin("caption")
        self.members = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, int, None]:
        g = torch.Generator().manual_seed(i)
        return torch.rand(3, self.size, self.size, generator=g), i, None


class StandInEncoder:
    """Embeddings of a small width for the caption table (no text model is run)."""

    name, token_dim, pooled_dim, max_length = "minilm", 8, 8, TEXT_LENGTH

    def encode(self, prompts: list[str]) -> TextEmbeddings:
        b = len(prompts)
        return TextEmbeddings(
            torch.randn(b, self.max_length, self.token_dim),
            torch.ones(b, self.max_length, dtype=torch.bool),
            torch.randn(b, self.pooled_dim),
        )


def write_cache(folder: Path, n: int, size: int) -> float:
    """The cache and its caption table; returns the seconds it took."""
    t0 = time.time()
    source = SyntheticCaptions(n, size)
    tokenizer = build_tokenizer("pixels")
    meta = prepare_cache(folder, source, tokenizer_meta(tokenizer, "pixels", size), 4096, "float16", flipped=False)
    shape = (tokenizer_meta(tokenizer, "pixels", size)["moment_channels"], size, size)
    with torch.no_grad():
        for k in range(num_shards(meta)):
            cache_shard(folder, meta, k, source, tokenizer.encode, 1024, 0, torch.device("cpu"), shape)
    counts = finalize_cache(folder, meta)
    assert counts["cached"] == n, counts
    write_caption_table(folder / "text" / text_cache_key("minilm", TEXT_LENGTH), source.vocabulary, StandInEncoder())
    return time.time() - t0


def _tree(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def _kib(pid: int, field: str, path: str) -> int:
    try:
        for line in (Path("/proc") / str(pid) / path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def train_peak(cache: Path, out: Path, steps: int) -> dict:
    """Peak summed RSS and PSS (MiB) of a training process and its workers, and how many processes."""
    argv = [
        sys.executable, "main_jepat.py", "--config", "shapes", "--dataset", "cached", "--data_path", str(cache),
        "--model", "tiny", "--img_size", "16", "--patch_size", "8", "--tokenizer", "pixels",
        "--text_max_length", str(TEXT_LENGTH), "--batch_size", "8", "--num_workers", "2", "--epochs", "1",
        "--max_steps", str(steps), "--no_eval", "--save_freq", "0", "--save_every_steps", "0", "--grid_freq", "0",
        "--precision", "fp32", "--device", "cpu", "--output_dir", str(out),
    ]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = {"rss": 0, "pss": 0, "pss_anon": 0, "pss_file": 0}
    procs = 0
    while proc.poll() is None:
        pids = _tree(proc.pid)
        now = {
            "rss": sum(_kib(p, "VmRSS:", "status") for p in pids),
            "pss": sum(_kib(p, "Pss:", "smaps_rollup") for p in pids),
            "pss_anon": sum(_kib(p, "Pss_Anon:", "smaps_rollup") for p in pids),
            "pss_file": sum(_kib(p, "Pss_File:", "smaps_rollup") for p in pids),
        }
        peak = {k: max(v, now[k]) for k, v in peak.items()}
        procs = max(procs, len(pids))
        time.sleep(0.02)
    log = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"training failed:\n{log[-3000:]}")
    return {**{f"{k}_MiB": v / 1024 for k, v in peak.items()}, "processes": procs}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,30000,300000", help="cache sizes (items)")
    p.add_argument("--steps", type=int, default=40, help="training steps per run")
    p.add_argument("--work", default=None, help="folder for the caches (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the rows here")
    a = p.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")]
    rows = []
    with tempfile.TemporaryDirectory(dir=a.work) as tmp:
        for n in sizes:
            cache = Path(tmp) / f"cache{n}"
            seconds = write_cache(cache, n, 16)
            row = {"items": n, "cache_seconds": seconds, **train_peak(cache, Path(tmp) / f"run{n}", a.steps)}
            rows.append(row)
            print(
                f"{n:>8} items: peak RSS {row['rss_MiB']:7.1f} MiB, PSS {row['pss_MiB']:7.1f} MiB = anonymous "
                f"{row['pss_anon_MiB']:7.1f} + mapped files {row['pss_file_MiB']:6.1f} MiB, over {row['processes']} "
                f"processes (cache written in {seconds:.0f} s)",
                flush=True,
            )
    base = rows[0]
    for row in rows[1:]:
        extra = row["items"] - base["items"]
        for k in ("rss", "pss", "pss_anon", "pss_file"):
            row[f"{k}_bytes_per_item"] = (row[f"{k}_MiB"] - base[f"{k}_MiB"]) * 2**20 / extra
        print(
            f"{base['items']} -> {row['items']} items, bytes per item: anonymous (heap) PSS "
            f"{row['pss_anon_bytes_per_item']:.0f}, mapped cache files {row['pss_file_bytes_per_item']:.0f}, "
            f"RSS {row['rss_bytes_per_item']:.0f} (process + loader workers)"
        )
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, numpy {np.__version__}, torch {torch.__version__}")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
