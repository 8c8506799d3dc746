"""Random-access read throughput of the latent cache against one .npz file per image (the
layout of the published code: ``np.savez(path, moments=..., moments_flip=...)``), on the same
latents, in one run. Prints samples/s of each and the ratio.

    python benchmarks/bench_cache.py                       # 2048 KL-16 latents at 256 px (64 KB each)
    python benchmarks/bench_cache.py --num 8192 --reads 4000 --dir /fast/disk/tmp

Both readers do the same work per sample as the training loader: pick the plain or flipped
moments at random and draw mean + std * noise. "warm": files in the page cache (just written);
"cold": evicted first with posix_fadvise(DONTNEED) (Linux; the disk and its cache decide).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.tokenizers import latents_from_moments  # noqa: E402
from util.data.latent_cache import CachedLatentDataset, cache_shard, finalize_cache, num_shards, prepare_cache  # noqa: E402


class RandomSource:
    """``num`` entries with one caption group each; images are placeholders (the moments are random)."""

    def __init__(self, num: int) -> None:
        self.kind, self.root = "class", "synthetic"
        self.paths = [f"class{i % 1000:04d}/img{i:07d}.JPEG" for i in range(num)]
        self.groups = [[f"a photo of class {g}"] for g in range(1000)]
        self.vocabulary = [g[0] for g in self.groups]
        self.entry_groups = [i % 1000 for i in range(num)]
        self.listing_skipped = []

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int):
        return torch.zeros(3, 2, 2), self.entry_groups[i], None


def build(root: Path, num: int, channels: int, size: int, shard_size: int) -> CachedLatentDataset:
    source = RandomSource(num)
    meta = prepare_cache(
        root / "cache",
        source,
        {
            "tokenizer": "kl16",
            "channels": channels,
            "stride": 16,
            "resolution": size * 16,
            "scaling": 0.2325,
            "shift": 0.0,
            "stochastic": True,
            "moment_channels": 2 * channels,
        },
        shard_size,
        "float32",
    )
    g = torch.Generator().manual_seed(0)

    def encode(x: torch.Tensor) -> torch.Tensor:  # [2b,3,2,2] -> [2b,2c,h,w]
        return torch.randn(x.shape[0], 2 * channels, size, size, generator=g)

    for k in range(num_shards(meta)):
        cache_shard(root / "cache", meta, k, source, encode, 256, 0, torch.device("cpu"), (2 * channels, size, size))
    finalize_cache(root / "cache", meta)
    ds = CachedLatentDataset(root / "cache")
    npz = root / "npz"
    for i in range(len(ds)):  # the same latents, one file per image
        path = npz / source.paths[i].replace(".JPEG", ".npz")
        path.parent.mkdir(parents=True, exist_ok=True)
        m = ds.moments(i)
        np.savez(path, moments=m[0], moments_flip=m[1])
    return ds


def npz_moments(path: Path) -> np.ndarray:
    """The published loader's read: open the image's file, take the plain or flipped moments."""
    data = np.load(path)
    return data["moments"] if torch.rand(()) < 0.5 else data["moments_flip"]


def cache_moments(ds: CachedLatentDataset, i: int) -> np.ndarray:
    return np.array(ds.moments(i)[int(torch.rand(()) < 0.5)])


def npz_item(path: Path, channels: int) -> torch.Tensor:
    """Read and sample, as a training item."""
    m = torch.from_numpy(npz_moments(path))[None]
    return latents_from_moments(m, torch.randn_like(m[:, :channels]), 0.2325)[0]


def evict(paths) -> None:
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn, order, batch: int) -> float:
    """samples/s of ``fn`` over ``order``, one index at a time (batch 0) or in batches."""
    start = time.perf_counter()
    if batch:
        for s in range(0, len(order), batch):
            fn(order[s : s + batch])
    else:
        for i in order:
            fn(i)
    return len(order) / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num", type=int, default=2048, help="cached images")
    p.add_argument("--reads", type=int, default=2048, help="random reads per measurement")
    p.add_argument("--channels", type=int, default=16, help="latent channels (KL-16: 16)")
    p.add_argument("--latent_size", type=int, default=16, help="latent grid (256 px / stride 16)")
    p.add_argument("--shard_size", type=int, default=16384)
    p.add_argument("--batch", type=int, default=256, help="batch size of the batched cache reader")
    p.add_argument("--repeats", type=int, default=3, help="warm measurements; the best is kept")
    p.add_argument("--dir", default=None, help="where to write the two layouts (default: a temp folder)")
    args = p.parse_args()
    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="bench_cache_", dir=args.dir))
    try:
        ds = build(root, args.num, args.channels, args.latent_size, args.shard_size)
        files = sorted(str(f) for f in (root / "npz").rglob("*.npz"))
        shards = sorted(str(f) for f in (root / "cache" / "shards").glob("shard-?????.npy"))
        npz_of = {i: root / "npz" / (ds.index[i]["path"].decode().replace(".JPEG", ".npz")) for i in range(len(ds))}
        rng = np.random.default_rng(0)
        item = 2 * 2 * args.channels * args.latent_size**2 * 4
        print(
            f"{len(ds)} latents of [2, {2 * args.channels}, {args.latent_size}, {args.latent_size}] float32 "
            f"({item / 1024:.0f} KB each): {len(shards)} shard file(s) vs {len(files)} .npz files; "
            f"{args.reads} random reads per measurement, one thread"
        )
        groups = {
            "read (moments of a random image, plain or flipped)": (
                ("one .npz per image", lambda i: npz_moments(npz_of[i]), files, 0),
                ("cache", lambda i: cache_moments(ds, i), shards, 0),
            ),
            "training item (read + sample mean + std * noise)": (
                ("one .npz per image", lambda i: npz_item(npz_of[i], args.channels), files, 0),
                ("cache", lambda i: ds[i], shards, 0),
                (f"cache, batches of {args.batch}", ds.__getitems__, shards, args.batch),
            ),
        }
        for title, readers in groups.items():
            print(title)
            for mode in ("cold", "warm"):
                results = {}
                for name, fn, paths, batch in readers:
                    best = 0.0
                    for _ in range(1 if mode == "cold" else args.repeats):
                        order = rng.integers(0, len(ds), args.reads).tolist()
                        if mode == "cold":
                            ds._shards.clear()  # reopen the memory maps too
                            evict(paths)
                        best = max(best, timed(fn, order, batch))
                    results[name] = best
                base = results["one .npz per image"]
                print(
                    f"  [{mode}] "
                    + "   ".join(
                        f"{k}: {v:.0f}/s" + (f" ({v / base:.1f}x)" if v != base else "") for k, v in results.items()
                    )
                )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
