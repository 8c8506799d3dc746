"""Caption embeddings computed once per unique caption, so the training step never runs the
frozen text encoder for a caption it has seen (for ``shapes`` and for ImageNet's 1000 prompts
every caption is known before training starts)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from models.text_encoders import TextEmbeddings, TextEncoder

log = logging.getLogger(__name__)


class TextEmbeddingTable:
    """Unique caption -> row of a stored ``TextEmbeddings``; unknown captions are encoded on
    first use and appended. Lookups return tensors on ``device``. Without an encoder (a table
    loaded from the on-disk cache) an unknown caption is an error."""

    def __init__(self, encoder: TextEncoder | None, device: torch.device | str = "cpu",
                 encode_batch_size: int = 256) -> None:
        self.encoder = encoder
        self.device = torch.device(device)
        self.encode_batch_size = encode_batch_size
        self.index: Dict[str, int] = {}
        self.table: TextEmbeddings | None = None

    def add(self, captions: Sequence[str]) -> None:
        """Encode the captions not yet in the table (in batches) and store them on the device."""
        new = list(dict.fromkeys(c for c in captions if c not in self.index))
        if not new:
            return
        if self.encoder is None:
            raise KeyError(f"{len(new)} caption(s) are not in the cached text embeddings (e.g. {new[0]!r}); "
                           "delete the text cache folder to rebuild it, or train without it")
        parts = [self.encoder.encode(new[i:i + self.encode_batch_size]).to(self.device)
                 for i in range(0, len(new), self.encode_batch_size)]
        start = len(self.index)
        self.index.update({c: start + i for i, c in enumerate(new)})
        self.table = TextEmbeddings.cat(([self.table] if self.table is not None else []) + parts)

    def __len__(self) -> int:
        return len(self.index)

    def ids(self, captions: Sequence[str]) -> torch.Tensor:
        """[B] long row ids on the device (encodes unknown captions first)."""
        self.add(captions)
        return torch.tensor([self.index[c] for c in captions], dtype=torch.long).to(self.device, non_blocking=True)

    def lookup(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embeddings of a batch of captions: tokens [B,S,Dt], mask [B,S], pooled [B,Du]."""
        ids = self.ids(captions)  # may grow the table
        return self.table[ids]

    def captions(self) -> List[str]:
        return list(self.index)


# ------------------------------------------------------------------ on-disk cache beside the latents
def text_cache_key(encoder: str, max_length: int | None, clip_model: str = "", path: str | None = None) -> str:
    """Folder name of a text-embedding cache: the encoder and everything that changes its output."""
    parts = [encoder]
    if encoder == "clip":
        parts += [clip_model, os.path.basename(str(path or "openai")).replace(".", "_")]
    parts.append(f"len{max_length or 'default'}")
    return "-".join(p.replace("/", "_") for p in parts)


@dataclass
class CachedTextEncoderInfo:
    """What training needs to know of a text encoder it does not build (dimensions, name)."""
    name: str
    token_dim: int
    pooled_dim: int
    max_length: int


def save_text_cache(directory: str | Path, table: TextEmbeddingTable) -> Path:
    """Store a table's tokens [U,S,Dt], mask [U,S], pooled [U,Dp] and caption list in
    ``directory`` (written to a temp folder, then renamed into place)."""
    if table.encoder is None or table.table is None:
        raise ValueError("save_text_cache needs a table filled by its encoder")
    directory, enc, emb = Path(directory), table.encoder, table.table
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", emb.tokens.float().cpu().numpy())
    np.save(tmp / "mask.npy", emb.mask.cpu().numpy())
    np.save(tmp / "pooled.npy", emb.pooled.float().cpu().numpy())
    info = {"name": enc.name, "token_dim": enc.token_dim, "pooled_dim": enc.pooled_dim,
            "max_length": enc.max_length, "captions": table.captions()}
    (tmp / "captions.json").write_text(json.dumps(info))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_text_cache(directory: str | Path, device: torch.device | str = "cpu"
                    ) -> Tuple[TextEmbeddingTable, CachedTextEncoderInfo] | None:
    """The table of a cache written by :func:`save_text_cache` (no encoder: an unknown caption
    raises), or None when there is no cache there."""
    directory = Path(directory)
    if not (directory / "captions.json").is_file():
        return None
    info = json.loads((directory / "captions.json").read_text())
    emb = TextEmbeddings(torch.from_numpy(np.load(directory / "tokens.npy")),
                         torch.from_numpy(np.load(directory / "mask.npy")),
                         torch.from_numpy(np.load(directory / "pooled.npy")))
    table = TextEmbeddingTable(None, device)
    table.index = {c: i for i, c in enumerate(info["captions"])}
    table.table = emb.to(device)
    log.info("loaded %d cached caption embeddings from %s", len(table), directory)
    return table, CachedTextEncoderInfo(info["name"], info["token_dim"], info["pooled_dim"], info["max_length"])
