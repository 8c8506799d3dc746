"""The latent cache: sharded, memory-mapped tokenizer moments of every image (and of its
horizontal flip, when the cache was made with flips).

Layout of a cache folder (format version ``FORMAT_VERSION``)::

    meta.json                 tokenizer name, channels, stride, resolution, scaling, shift, dtype,
                              shard size, flipped, counts, format version, complete flag
    listing.json              the source (kind, root, every entry's path; for tar shards where each
                              image member lies) and the caption groups
    shards/shard-00000.npy    [n, s, m, h, w] moments (plain, and flipped when s = 2); m = 2c for a VAE
                              (mean ++ log-variance), c for a deterministic tokenizer (pixels)
    shards/shard-00000.state.npy  [n] uint8: 0 pending, 1 cached, 2 skipped
    shards/shard-00000.group.npy  [n] int32 caption group (label for ImageNet)
    shards/shard-00000.log.jsonl  skip / conversion records of this shard
    index.npy                 one row per cached image: item, shard, row, group, source path
    caption_groups.npz        each caption group's rows of the caption table (CSR: offsets, rows)
    skipped.jsonl, converted.jsonl   every entry not cached / cached after a conversion, with why
    text/<encoder key>/       cached caption embeddings (util/data/captions.py)

Shards are fixed runs of ``shard_size`` entries of the listing, whatever the number of ranks;
shard k belongs to rank ``k % world_size``. A row's moments are flushed before its state byte,
so a killed run resumes exactly where it stopped: rows still pending are encoded, nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from models.tokenizers import Tokenizer, latents_from_moments
from util.data.caption_table import CaptionRows, CaptionTable, group_rows
from util.data.draws import ItemKey, item_generator, item_key
from util.data.image_folders import BadImage, CaptionOrigin, Listing, load_image, to_tensor
from util.data.pairs import PairsDataset
from util.data.shapes import ShapesDataset

FORMAT_VERSION = 1
PENDING, CACHED, SKIPPED = 0, 1, 2


# ------------------------------------------------------------------ sources
class ListingSource:
    """Images named by a :class:`Listing`; ``load`` returns (image [3,S,S], group, note)."""

    def __init__(self, listing: Listing, size: int, small: str = "upscale") -> None:
        self.listing, self.size, self.small = listing, size, small
        self.kind, self.root = listing.kind, listing.root
        self.paths, self.groups, self.vocabulary = listing.paths, listing.captions, listing.vocabulary()
        self.listing_skipped, self.entry_groups = listing.skipped, listing.groups
        self.caption_origin = listing.caption_origin()
        self.members = listing.members

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, int, str | None]:
        img, note = load_image(self.listing.image_file(i), self.size, self.small)
        return to_tensor(img), self.listing.groups[i], note


class BuiltinSource:
    """A procedural set (``shapes`` or ``pairs``) as a source: one caption group per distinct caption."""

    def __init__(self, name: str, num_samples: int, size: int, seed: int) -> None:
        sets = {"shapes": ShapesDataset, "pairs": PairsDataset}
        if name not in sets:
            raise ValueError(f"unknown built-in set {name!r}; choices: {sorted(sets)}")
        self.data = sets[name](split="train", num_samples=num_samples, resolution=size, seed=seed)
        self.kind, self.root = "caption", f"{name}(seed={seed})"
        self.vocabulary = self.data.caption_vocabulary()
        self.groups = [[c] for c in self.vocabulary]
        self._group = {c: g for g, c in enumerate(self.vocabulary)}
        self.paths = [f"{name}/{seed}/{i}" for i in range(num_samples)]
        self.listing_skipped: list[dict] = []
        self.entry_groups = None  # known when an image is drawn
        self.caption_origin = self.data.caption_origin()
        self.members = None

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, i: int) -> tuple[torch.Tensor, int, str | None]:
        image, caption = self.data[i]
        return image, self._group[caption], None


class _EncodeItems(Dataset):
    """Loader items for the cache writer: (entry, image or None, group, note, reason)."""

    def __init__(self, source, items: Sequence[int]) -> None:
        self.source, self.items = source, list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int):
        i = self.items[k]
        try:
            image, group, note = self.source.load(i)
            return i, image, group, note, None
        except BadImage as e:
            return i, None, -1, None, str(e)
        except Exception as e:  # one bad file never stops the run; the reason is kept
            return i, None, -1, None, f"unreadable ({type(e).__name__}: {e})"


def _keep_lists(batch):
    return batch


# ------------------------------------------------------------------ writing
def listing_digest(source) -> str:
    h = hashlib.sha256()
    h.update(source.kind.encode())
    for p in source.paths:
        h.update(p.encode("utf-8", "surrogateescape") + b"\0")
    h.update(json.dumps(source.groups).encode())
    if source.members is not None:  # tar shards: a shard rewritten with the same names is another source
        h.update(json.dumps(source.members.tars).encode())
        h.update(source.members.where.tobytes())
    return h.hexdigest()


def atomic_write_json(path: Path, obj) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no latent cache at {cache_dir} (meta.json missing); create one with main_cache.py (scripts/cache_vae.sh)"
        )
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"latent cache {cache_dir} has format version {meta.get('format_version')}, this code reads "
            f"version {FORMAT_VERSION}; cache again with this version of main_cache.py"
        )
    return meta


def sides(meta: dict) -> int:
    """Moments stored per image: 2 (plain and flipped) or 1 (plain). Caches written before flips
    became a choice always hold both."""
    return 2 if meta.get("flipped", True) else 1


def prepare_cache(
    cache_dir: Path,
    source,
    tokenizer_meta: dict,
    shard_size: int,
    dtype: str,
    vae_source: str = "",
    flipped: bool = True,
) -> dict:
    """Create the cache folder (or check that a partial one was made from the same source and
    settings) and return its meta. Run on one rank only."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    (cache_dir / "shards").mkdir(exist_ok=True)
    digest = listing_digest(source)
    settings = {**tokenizer_meta, "shard_size": shard_size, "dtype": dtype, "flipped": flipped}
    if (cache_dir / "meta.json").is_file():
        meta = read_meta(cache_dir)
        diff = {k: (meta.get(k), v) for k, v in settings.items() if meta.get(k) != v}
        if diff:
            raise ValueError(
                f"{cache_dir} holds a cache made with other settings ("
                + ", ".join(f"{k}: {a} there vs {b} now" for k, (a, b) in diff.items())
                + "); use a new --cache_dir or the original arguments"
            )
        if meta["listing_digest"] != digest:
            raise ValueError(
                f"the images listed for {cache_dir} changed since it was started ({meta['num_entries']} "
                f"entries then, {len(source)} now); finish it with the original files or use a new "
                "--cache_dir"
            )
        return meta
    atomic_write_json(
        cache_dir / "listing.json",
        {
            "kind": source.kind,
            "root": source.root,
            "paths": source.paths,
            "groups": source.groups,
            "entry_groups": source.entry_groups,
            "vocabulary": source.vocabulary,
            "listing_skipped": source.listing_skipped,
            "caption_source": source.caption_origin.to_dict(),
            "members": None if source.members is None else source.members.to_json(),
        },
    )
    meta = {
        "format_version": FORMAT_VERSION,
        **settings,
        "num_entries": len(source),
        "listing_digest": digest,
        "kind": source.kind,
        "root": source.root,
        "vae_source": vae_source,
        "complete": False,
        "caption_source": source.caption_origin.to_dict(),
    }
    atomic_write_json(cache_dir / "meta.json", meta)
    return meta


def num_shards(meta: dict) -> int:
    return (meta["num_entries"] + meta["shard_size"] - 1) // meta["shard_size"]


def shard_rows(meta: dict, k: int) -> range:
    return range(k * meta["shard_size"], min((k + 1) * meta["shard_size"], meta["num_entries"]))


def _shard_paths(cache_dir: Path, k: int) -> dict[str, Path]:
    base = cache_dir / "shards" / f"shard-{k:05d}"
    return {s: Path(f"{base}{s}") for s in (".npy", ".state.npy", ".group.npy", ".log.jsonl")}


def open_shard(cache_dir: Path, meta: dict, k: int, sample_shape: tuple[int, ...]):
    """(moments, state, group) memmaps of shard k, created on first use."""
    paths, n = _shard_paths(cache_dir, k), len(shard_rows(meta, k))
    if not paths[".state.npy"].is_file():  # the state file is created last: without it, start over
        np.lib.format.open_memmap(
            paths[".npy"], mode="w+", dtype=meta["dtype"], shape=(n, sides(meta)) + tuple(sample_shape)
        )
        np.lib.format.open_memmap(paths[".group.npy"], mode="w+", dtype=np.int32, shape=(n,))
        np.lib.format.open_memmap(paths[".state.npy"], mode="w+", dtype=np.uint8, shape=(n,))
    data = np.load(paths[".npy"], mmap_mode="r+")
    if data.shape[1:] != (sides(meta),) + tuple(sample_shape):
        raise ValueError(
            f"shard {paths['.npy']} holds moments {data.shape[1:]}, expected {(sides(meta),) + tuple(sample_shape)}"
        )
    return data, np.load(paths[".state.npy"], mmap_mode="r+"), np.load(paths[".group.npy"], mmap_mode="r+")


def cache_shard(
    cache_dir: Path,
    meta: dict,
    k: int,
    source,
    encode_moments,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    sample_shape: tuple[int, ...],
    max_batches: int | None = None,
    progress=None,
) -> tuple[int, bool]:
    """Encode the pending rows of shard k. ``encode_moments``: images [B,3,S,S] -> [B,m,h,w].
    Returns (batches run, finished)."""
    data, state, group = open_shard(cache_dir, meta, k, sample_shape)
    first = shard_rows(meta, k).start
    pending = [first + r for r in np.flatnonzero(state == PENDING).tolist()]
    loader = torch.utils.data.DataLoader(
        _EncodeItems(source, pending),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_keep_lists,
    )
    log_path = _shard_paths(cache_dir, k)[".log.jsonl"]
    batches = 0
    with open(log_path, "a", encoding="utf-8") as log_file:
        for batch in loader:
            if max_batches is not None and batches >= max_batches:
                return batches, False
            good = [b for b in batch if b[1] is not None]
            if good:
                x = torch.stack([b[1] for b in good]).to(device)  # [b,3,S,S]
                views = [x, x.flip(-1)] if sides(meta) == 2 else [x]
                m = encode_moments(torch.cat(views)).float().cpu().numpy()  # [sb,m,h,w]
                m = np.stack(np.split(m, len(views)), axis=1)  # [b,s,m,h,w]
                rows = np.array([b[0] - first for b in good])
                data[rows] = m.astype(data.dtype)
                group[rows] = [b[2] for b in good]
                data.flush()
                group.flush()
            for i, _, _, note, reason in batch:
                if reason is not None or note is not None:
                    log_file.write(
                        json.dumps(
                            {
                                "item": i,
                                "path": source.paths[i],
                                "reason": reason or note,
                                "action": "skipped" if reason is not None else "converted",
                            }
                        )
                        + "\n"
                    )
            log_file.flush()
            for i, image, *_ in batch:
                state[i - first] = CACHED if image is not None else SKIPPED
            state.flush()
            batches += 1
            if progress is not None:
                progress(len(batch), len(batch) - len(good))
    return batches, True


def finalize_cache(cache_dir: Path, meta: dict) -> dict:
    """Gather the shards' states into ``index.npy``, ``skipped.jsonl`` and ``converted.jsonl``;
    mark the cache complete when nothing is pending. Returns the counts."""
    listing = json.loads((cache_dir / "listing.json").read_text())
    states, groups, records = [], [], {}
    for k in range(num_shards(meta)):
        paths = _shard_paths(cache_dir, k)
        n = len(shard_rows(meta, k))
        if paths[".state.npy"].is_file():
            states.append(np.load(paths[".state.npy"]))
            groups.append(np.load(paths[".group.npy"]))
        else:
            states.append(np.zeros(n, np.uint8))
            groups.append(np.full(n, -1, np.int32))
        if paths[".log.jsonl"].is_file():
            for line in paths[".log.jsonl"].read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                records[rec["item"]] = rec  # a record written again after a kill replaces the first
    state, group = np.concatenate(states), np.concatenate(groups)
    cached = np.flatnonzero(state == CACHED)
    width = max([len(p.encode("utf-8", "surrogateescape")) for p in listing["paths"]] + [1])
    index = np.zeros(
        len(cached), dtype=[("item", "<i8"), ("shard", "<i4"), ("row", "<i4"), ("group", "<i4"), ("path", f"S{width}")]
    )
    index["item"] = cached
    index["shard"] = cached // meta["shard_size"]
    index["row"] = cached % meta["shard_size"]
    index["group"] = group[cached]
    index["path"] = [listing["paths"][i].encode("utf-8", "surrogateescape") for i in cached.tolist()]
    tmp = cache_dir / ".index.npy.tmp"
    with open(tmp, "wb") as f:
        np.save(f, index)
    os.replace(tmp, cache_dir / "index.npy")
    np.savez(cache_dir / "caption_groups.npz", **group_rows(listing["groups"], listing["vocabulary"]))
    skipped = [{"path": r["path"], "reason": r["reason"], "stage": "listing"} for r in listing["listing_skipped"]]
    skipped += [
        {"path": records[i]["path"], "reason": records[i]["reason"], "stage": "load"}
        for i in np.flatnonzero(state == SKIPPED).tolist()
    ]
    converted = [
        {"path": r["path"], "note": r["reason"]}
        for i, r in sorted(records.items())
        if r["action"] == "converted" and state[i] == CACHED
    ]
    for name, recs in (("skipped.jsonl", skipped), ("converted.jsonl", converted)):
        with open(cache_dir / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in recs)
    counts = {
        "seen": len(listing["paths"]) + len(listing["listing_skipped"]),
        "cached": int(len(cached)),
        "skipped": len(skipped),
        "converted": len(converted),
        "pending": int((state == PENDING).sum()),
    }
    meta.update(counts=counts, complete=counts["pending"] == 0)
    atomic_write_json(cache_dir / "meta.json", meta)
    return counts


# ------------------------------------------------------------------ reading
class CachedLatentDataset(Dataset):
    """(latent [c,h,w], caption) from a finished cache: per item the plain or, with ``flip``, at
    random the flipped moments, a latent sampled from them (mean + std * noise, then
    ``(z - shift) * scaling``), and one caption of the item's group. Shards are memory-mapped
    on first use in each worker process. ``flip`` None: flip when the cache holds flipped moments
    of class folders (MAR's convention; captions may name left and right)."""

    def __init__(self, cache_dir: str | Path, flip: bool | None = None) -> None:
        self.dir = Path(cache_dir)
        self.meta = read_meta(self.dir)
        if not self.meta.get("complete"):
            c = self.meta.get("counts", {})
            raise ValueError(
                f"latent cache {cache_dir} is incomplete ({c.get('pending', 'some')} entries pending); "
                "rerun main_cache.py with the same arguments to finish it"
            )
        # read where it is needed, a batch at a time: nothing per item is held in memory (or copied
        # into forked loader workers)
        self.index = np.load(self.dir / "index.npy", mmap_mode="r")
        groups = np.load(self.dir / "caption_groups.npz")
        self._group_offsets, self._group_rows = groups["offsets"], groups["rows"]
        self._vocabulary: list[str] | None = None  # read from listing.json only when strings are asked for
        self.caption_table: CaptionTable | None = None  # items carry its rows instead of strings (opened per worker)
        self._table_dir: Path | None = None
        self._origin = CaptionOrigin.from_dict(
            self.meta.get("caption_source")
            or (  # caches made before it
                {"kind": "shapes"}
                if str(self.meta.get("root", "")).startswith("shapes(")
                # was recorded
                else {"kind": self.meta.get("kind", "caption")}
            )
        )
        if flip is None:
            flip = sides(self.meta) == 2 and self.meta.get("kind") == "class"
        if flip and sides(self.meta) == 1:
            raise ValueError(
                f"latent cache {cache_dir} holds no flipped moments (made with --no-random_flip); train "
                "with --no-random_flip, or cache again with --random_flip"
            )
        self.flip = flip
        self.channels, self.scaling, self.shift = self.meta["channels"], self.meta["scaling"], self.meta["shift"]
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.index)

    def use_caption_table(self, table_dir: str | Path) -> None:
        """Items carry their caption's embeddings (``CaptionRows``, float16) from the cache's caption
        table instead of the caption: gathered in the loader workers, so the training thread only
        moves them to the device, and nothing per caption is held in memory."""
        self._table_dir, self.caption_table = Path(table_dir), None

    def caption_vocabulary(self) -> list[str]:
        """Every caption, in caption-table row order (read from listing.json on first use)."""
        if self._vocabulary is None:
            self._vocabulary = json.loads((self.dir / "listing.json").read_text())["vocabulary"]
        return list(self._vocabulary)

    def caption_origin(self) -> CaptionOrigin:
        """How the cached captions were made (see ``Listing.caption_origin``)."""
        return self._origin

    def check(self, tokenizer: str, img_size: int) -> None:
        """Refuse a cache made with another tokenizer or resolution."""
        have = (self.meta["tokenizer"], self.meta["resolution"])
        if have != (tokenizer, img_size):
            raise ValueError(
                f"latent cache {self.dir} was made with tokenizer {have[0]!r} at {have[1]} px, but training "
                f"asks for --tokenizer {tokenizer} --img_size {img_size}; pass --tokenizer {have[0]} "
                f"--img_size {have[1]}, or cache again with main_cache.py --tokenizer {tokenizer} "
                f"--img_size {img_size}"
            )

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            mm = np.load(self.dir / "shards" / f"shard-{k:05d}.npy", mmap_mode="r")
            self._shards[k] = mm.view(np.ndarray)  # plain views index faster than np.memmap objects
        return self._shards[k]

    def _where(self, idx: np.ndarray) -> np.ndarray:
        """[B, 3] int64 (shard, row, caption group) of items ``idx`` [B], from the mapped index."""
        rec = self.index[np.asarray(idx, dtype=np.int64)]
        return np.stack([rec["shard"], rec["row"], rec["group"]], axis=1).astype(np.int64)

    def moments(self, i: int) -> np.ndarray:
        """[s, m, h, w] moments of item i (plain, and flipped when the cache holds flips)."""
        shard, row, _ = self._where(np.array([i]))[0]
        return self._shard(int(shard))[int(row)]

    def _latents(self, m: torch.Tensor, gens: list[torch.Generator]) -> torch.Tensor:
        """moments [B,m,h,w] -> latents [B,c,h,w]: sampled for a VAE (item b's noise from
        ``gens[b]``), as stored for pixels."""
        if self.meta["stochastic"]:  # mean ++ log-variance
            shape = (self.channels, *m.shape[2:])
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])  # [B,c,h,w]
            return latents_from_moments(m, noise, self.scaling, self.shift)
        return (m - self.shift) * self.scaling

    def _caption_row(self, g: int, pick: float) -> int:
        """The table row of one caption of caption group g, drawn by ``pick`` in [0, 1)."""
        lo, hi = int(self._group_offsets[g]), int(self._group_offsets[g + 1])
        return int(self._group_rows[lo + min(int(pick * (hi - lo)), hi - lo - 1)])

    def _captions(self, groups: np.ndarray, pick: torch.Tensor) -> list:
        """The batch's captions (of caption groups ``groups``): strings, or with a caption table
        their embeddings row by row."""
        rows = np.asarray([self._caption_row(int(g), float(p)) for g, p in zip(groups.tolist(), pick)], dtype=np.int64)
        if self._table_dir is not None:
            if self.caption_table is None:  # opened in the process that reads (each loader worker)
                self.caption_table = CaptionTable(self._table_dir)
            r = self.caption_table.gather(rows)
            return [CaptionRows(r.tokens[j], r.mask[j], r.pooled[j]) for j in range(len(rows))]
        if self._vocabulary is None:
            self.caption_vocabulary()
        return [self._vocabulary[row] for row in rows.tolist()]

    def __getitem__(self, key: ItemKey | int) -> tuple[torch.Tensor, str]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[ItemKey | int]) -> list[tuple[torch.Tensor, str]]:
        """A whole batch at once (the DataLoader calls this when batching): rows are gathered
        shard by shard in sorted order and the latents sampled in one call; each item's flip,
        noise and caption are drawn from its own key."""
        keys = [item_key(k) for k in keys]
        gens = [item_generator(k) for k in keys]
        flip, pick = torch.stack([torch.rand(2, generator=g) for g in gens]).unbind(1)  # [B], [B]
        idx = np.asarray([k.index for k in keys], dtype=np.int64)
        sides = (flip < 0.5).long().numpy() if self.flip else np.zeros(len(idx), np.int64)
        where = self._where(idx)  # [B,3] shard, row, group
        out = np.empty((len(idx),) + self._shard(int(where[0, 0])).shape[2:], dtype=np.float32)
        shard = where[:, 0]
        for k in np.unique(shard).tolist():
            sel = np.flatnonzero(shard == k)
            rows = where[sel, 1]
            order = np.argsort(rows, kind="stable")
            out[sel[order]] = self._shard(k)[rows[order], sides[sel[order]]]
        z = self._latents(torch.from_numpy(out), gens)  # [B,c,h,w]
        return list(zip(z, self._captions(where[:, 2], pick)))


class CachedLatentInput(Tokenizer):
    """Training from a cache: the batches already are latents, so ``encode`` passes them through
    (checking their shape); ``decode`` is the real tokenizer's, for sample grids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        super().__init__()
        self.inner = tokenizer
        self.name, self.channels, self.stride = tokenizer.name, tokenizer.channels, tokenizer.stride

    def encode(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.dim() != 4 or latents.shape[1] != self.channels:
            raise ValueError(f"cached latents must be [B,{self.channels},h,w], got {tuple(latents.shape)}")
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.inner.decode(latents)
