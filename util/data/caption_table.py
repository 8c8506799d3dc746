"""Caption embeddings on disk: one row per unique caption of a latent cache, memory-mapped and
read per batch like the latents, so that nothing per caption is held in host or device memory.

Folder ``<cache>/text/<encoder key>/``::

    table.json        encoder name, token_dim, pooled_dim, max_length, rows, dtype, format version
    tokens.npy        [U, S, Dt] float16 token states
    mask.npy          [U, S] bool, True for real tokens
    pooled.npy        [U, Du] float16 pooled vectors
    state.npy         [U] uint8, 1 once a row is written (a killed run resumes at the missing rows)
    captions.bin      the captions, UTF-8, back to back; offsets.npy [U+1] int64 byte offsets
    hashes.npy        [U] uint64 caption hashes, sorted; order.npy [U] int64 their rows

Row r holds caption r of the cache's vocabulary (``listing.json``), the order in which the cache's
``caption_groups.npz`` names them, so a cached item carries its caption's rows (``CaptionRows``), not strings.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from models.text_encoders import TextEmbeddings, TextEncoder

log = logging.getLogger(__name__)

TABLE_VERSION = 1


def caption_hash(caption: str) -> int:
    """A 64-bit hash of a caption (blake2b), the same in every process."""
    return int.from_bytes(hashlib.blake2b(caption.encode("utf-8"), digest_size=8).digest(), "little")


class CaptionRows(NamedTuple):
    """Caption embeddings as the table stores them, for a batch (or one item): the loader gathers
    them in its workers and torch's default collate stacks them; ``ModelInputs`` moves them."""

    tokens: torch.Tensor  # [B,S,Dt] float16
    mask: torch.Tensor  # [B,S] bool
    pooled: torch.Tensor  # [B,Du] float16


class CaptionTable:
    """A finished caption table, opened read-only (memory-mapped)."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.info = json.loads((self.dir / "table.json").read_text())
        if self.info.get("format_version") != TABLE_VERSION:
            raise ValueError(
                f"caption table {self.dir} has format {self.info.get('format_version')}; this code "
                f"reads {TABLE_VERSION}: delete the folder and run main_cache.py again"
            )
        state = np.load(self.dir / "state.npy", mmap_mode="r")
        if not state.all():
            raise ValueError(
                f"caption table {self.dir} is incomplete ({int((state == 0).sum())} rows missing); "
                "rerun main_cache.py with the same arguments to finish it"
            )
        self.tokens = np.load(self.dir / "tokens.npy", mmap_mode="r")
        self.mask = np.load(self.dir / "mask.npy", mmap_mode="r")
        self.pooled = np.load(self.dir / "pooled.npy", mmap_mode="r")
        self._offsets = np.load(self.dir / "offsets.npy", mmap_mode="r")
        self._hashes: np.ndarray | None = None  # loaded on the first find (evaluation prompts only)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def rows(self, ids: torch.Tensor, device: torch.device) -> TextEmbeddings:
        """Embeddings of rows ``ids`` [B]: tokens [B,S,Dt] and pooled [B,Du] as float32, mask [B,S]."""
        r = self.gather(ids.cpu().numpy())
        return TextEmbeddings(r.tokens.float(), r.mask, r.pooled.float()).to(device)

    def gather(self, idx: np.ndarray) -> CaptionRows:
        """Rows ``idx`` [B] as stored (float16 tokens and pooled), read in sorted order (the reads
        touch the file in order): what a loader worker hands over."""
        order = np.argsort(idx, kind="stable")
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        sorted_idx = idx[order]

        def take(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a[sorted_idx]))[back]

        return CaptionRows(take(self.tokens), take(self.mask), take(self.pooled))

    def caption(self, row: int) -> str:
        with open(self.dir / "captions.bin", "rb") as f:
            f.seek(int(self._offsets[row]))
            return f.read(int(self._offsets[row + 1] - self._offsets[row])).decode("utf-8")

    def find(self, captions: Sequence[str]) -> np.ndarray:
        """Row of each caption, or -1 where the table does not hold it."""
        if self._hashes is None:
            self._hashes = np.load(self.dir / "hashes.npy", mmap_mode="r")
            self._order = np.load(self.dir / "order.npy", mmap_mode="r")
        out = np.full(len(captions), -1, dtype=np.int64)
        for i, c in enumerate(captions):
            h = np.uint64(caption_hash(c))
            k = int(np.searchsorted(self._hashes, h))
            while k < len(self._hashes) and self._hashes[k] == h:  # a collision is checked against the text
                if self.caption(int(self._order[k])) == c:
                    out[i] = int(self._order[k])
                    break
                k += 1
        return out


def write_caption_table(
    directory: Path,
    vocabulary: Sequence[str],
    encoder: TextEncoder,
    batch_size: int = 1024,
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Encode every caption of ``vocabulary`` into a table at ``directory``, in batches; rerun
    after a kill, it encodes only the rows not yet written. Returns the table's info."""
    directory.mkdir(parents=True, exist_ok=True)
    info = {
        "format_version": TABLE_VERSION,
        "name": encoder.name,
        "token_dim": encoder.token_dim,
        "pooled_dim": encoder.pooled_dim,
        "max_length": encoder.max_length,
        "rows": len(vocabulary),
        "dtype": "float16",
    }
    info_path = directory / "table.json"
    if info_path.is_file() and json.loads(info_path.read_text()) != info:
        raise ValueError(f"{directory} holds a caption table of another encoder or vocabulary; delete it to rebuild")
    if not info_path.is_file():
        _create(directory, vocabulary, info)
    tokens = np.load(directory / "tokens.npy", mmap_mode="r+")
    mask = np.load(directory / "mask.npy", mmap_mode="r+")
    pooled = np.load(directory / "pooled.npy", mmap_mode="r+")
    state = np.load(directory / "state.npy", mmap_mode="r+")
    pending = np.flatnonzero(state == 0)
    for start in range(0, len(pending), batch_size):
        rows = pending[start : start + batch_size]
        emb = encoder.encode([vocabulary[r] for r in rows.tolist()])
        tokens[rows] = emb.tokens.float().cpu().numpy().astype(np.float16)
        mask[rows] = emb.mask.cpu().numpy()
        pooled[rows] = emb.pooled.float().cpu().numpy().astype(np.float16)
        for a in (tokens, mask, pooled):
            a.flush()
        state[rows] = 1  # after the rows themselves: a kill leaves them pending
        state.flush()
        if progress is not None:
            progress(len(rows))
    return info


def _create(directory: Path, vocabulary: Sequence[str], info: dict) -> None:
    """Allocate the arrays and write the captions and their hash index (table.json last)."""
    U, S = len(vocabulary), info["max_length"]
    np.lib.format.open_memmap(directory / "tokens.npy", "w+", np.float16, (U, S, info["token_dim"]))
    np.lib.format.open_memmap(directory / "mask.npy", "w+", np.bool_, (U, S))
    np.lib.format.open_memmap(directory / "pooled.npy", "w+", np.float16, (U, info["pooled_dim"]))
    np.lib.format.open_memmap(directory / "state.npy", "w+", np.uint8, (U,))
    offsets = np.zeros(U + 1, dtype=np.int64)
    hashes = np.zeros(U, dtype=np.uint64)
    with open(directory / "captions.bin", "wb") as f:
        for r, c in enumerate(vocabulary):
            data = c.encode("utf-8")
            f.write(data)
            offsets[r + 1] = offsets[r] + len(data)
            hashes[r] = caption_hash(c)
    order = np.argsort(hashes, kind="stable")
    np.save(directory / "offsets.npy", offsets)
    np.save(directory / "hashes.npy", hashes[order])
    np.save(directory / "order.npy", order.astype(np.int64))
    (directory / "table.json").write_text(json.dumps(info))


def group_rows(groups: list[list[str]], vocabulary: Sequence[str]) -> dict[str, np.ndarray]:
    """The caption rows of each caption group, as CSR arrays: rows of group g are
    ``rows[offsets[g]:offsets[g + 1]]`` (rows index ``vocabulary``)."""
    index = {c: r for r, c in enumerate(vocabulary)}
    offsets = np.zeros(len(groups) + 1, dtype=np.int64)
    rows = np.empty(sum(len(g) for g in groups), dtype=np.int64)
    for g, caps in enumerate(groups):
        offsets[g + 1] = offsets[g] + len(caps)
        rows[offsets[g] : offsets[g + 1]] = [index[c] for c in caps]
    return {"offsets": offsets, "rows": rows}
