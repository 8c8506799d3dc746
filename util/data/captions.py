"""The caption store: caption embeddings computed once per unique caption, so the training step
never runs the frozen text encoder for a caption it has seen (for ``shapes`` and for ImageNet's
1000 prompts every caption is known before training starts), and their on-disk cache beside the
latents of a ``main_cache.py`` folder.

How a run's captions are embedded is a small dictionary (``caption_recipe``) stored in every
checkpoint, so sampling and evaluation rebuild the same store from the checkpoint alone.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from models.text_encoders import TextEmbeddings, TextEncoder, build_text_encoder

log = logging.getLogger(__name__)


class CaptionStore:
    """Unique caption -> row of a stored ``TextEmbeddings``; unknown captions are encoded on first
    use and appended. Lookups return tensors on ``device``. Without an encoder (a store loaded from
    the on-disk cache) an unknown caption is an error.

    ``info``: the encoder's name, token_dim, pooled_dim and max_length (what the model is built for).
    """

    def __init__(self, encoder: Optional[TextEncoder], device: torch.device | str = "cpu",
                 encode_batch_size: int = 256, info: Optional[Dict[str, Any]] = None) -> None:
        if encoder is None and info is None:
            raise ValueError("a CaptionStore needs an encoder or the info of the encoder its cache came from")
        self.encoder = encoder
        self.device = torch.device(device)
        self.encode_batch_size = encode_batch_size
        self.info = info or {"name": encoder.name, "token_dim": encoder.token_dim, "pooled_dim": encoder.pooled_dim,
                             "max_length": encoder.max_length}
        self.index: Dict[str, int] = {}
        self.table: TextEmbeddings | None = None

    def add(self, captions: Sequence[str]) -> None:
        """Encode the captions not yet in the store (in batches) and keep them on the device."""
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

    def lookup(self, captions: Sequence[str]) -> TextEmbeddings:
        """Embeddings of a batch of captions: tokens [B,S,Dt], mask [B,S], pooled [B,Du]."""
        self.add(captions)  # may grow the table
        ids = torch.tensor([self.index[c] for c in captions], dtype=torch.long).to(self.device, non_blocking=True)
        return self.table[ids]

    def captions(self) -> List[str]:
        return list(self.index)


# ------------------------------------------------------------------ how a run embeds its captions
def caption_recipe(dataset: str, data_path: str, text_encoder: str, clip_model: str,
                   text_encoder_path: Optional[str], text_max_length: int) -> Dict[str, Any]:
    """The dictionary a checkpoint keeps of how its training captions were made and embedded."""
    return {"dataset": dataset, "data_path": data_path, "text_encoder": text_encoder, "clip_model": clip_model,
            "text_encoder_path": text_encoder_path, "text_max_length": text_max_length}


def text_cache_key(encoder: str, max_length: int | None, clip_model: str = "", path: str | None = None) -> str:
    """Folder name of a text-embedding cache: the encoder and everything that changes its output."""
    parts = [encoder]
    if encoder == "clip":
        parts += [clip_model, os.path.basename(str(path or "openai")).replace(".", "_")]
    parts.append(f"len{max_length or 'default'}")
    return "-".join(p.replace("/", "_") for p in parts)


def cached_text_dir(recipe: Dict[str, Any]) -> Optional[Path]:
    """Where a latent cache keeps this encoder's caption embeddings (None unless the dataset is ``cached``)."""
    if recipe["dataset"] != "cached":
        return None
    key = text_cache_key(recipe["text_encoder"], recipe["text_max_length"], recipe["clip_model"],
                         recipe["text_encoder_path"])
    return Path(recipe["data_path"]) / "text" / key


def build_caption_store(recipe: Dict[str, Any], device: torch.device, use_cache: bool = True) -> CaptionStore:
    """The cached embeddings of a latent cache when it holds them and ``use_cache`` (the text
    encoder is then never built), else a store over the text encoder the recipe names."""
    text_dir = cached_text_dir(recipe) if use_cache else None
    if text_dir is not None and (text_dir / "captions.json").is_file():
        return load_text_cache(text_dir, device)
    encoder = build_text_encoder(recipe["text_encoder"], path=recipe["text_encoder_path"],
                                 clip_model=recipe["clip_model"], max_length=recipe["text_max_length"] or None,
                                 device=str(device))
    return CaptionStore(encoder, device)


def check_widths(store: CaptionStore, token_dim: int, pooled_dim: int, source: str) -> None:
    """The store's embeddings must have the widths the model was built for."""
    have = (store.info["token_dim"], store.info["pooled_dim"])
    if have != (token_dim, pooled_dim):
        raise SystemExit(f"text encoder {store.info['name']} gives widths {have} but {source} was trained with "
                         f"{(token_dim, pooled_dim)}; pass the same encoder (--text_encoder_path)")


def save_text_cache(directory: str | Path, store: CaptionStore) -> Path:
    """Store the tokens [U,S,Dt], mask [U,S], pooled [U,Dp] and caption list in ``directory``
    (written to a temp folder, then renamed into place)."""
    if store.encoder is None or store.table is None:
        raise ValueError("save_text_cache needs a store filled by its encoder")
    directory, emb = Path(directory), store.table
    tmp = directory.with_name(f".{directory.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    np.save(tmp / "tokens.npy", emb.tokens.float().cpu().numpy())
    np.save(tmp / "mask.npy", emb.mask.cpu().numpy())
    np.save(tmp / "pooled.npy", emb.pooled.float().cpu().numpy())
    (tmp / "captions.json").write_text(json.dumps({**store.info, "captions": store.captions()}))
    shutil.rmtree(directory, ignore_errors=True)
    os.replace(tmp, directory)
    return directory


def load_text_cache(directory: str | Path, device: torch.device | str = "cpu") -> CaptionStore:
    """The store of a cache written by :func:`save_text_cache` (no encoder: an unknown caption raises)."""
    directory = Path(directory)
    info = json.loads((directory / "captions.json").read_text())
    emb = TextEmbeddings(torch.from_numpy(np.load(directory / "tokens.npy")),
                         torch.from_numpy(np.load(directory / "mask.npy")),
                         torch.from_numpy(np.load(directory / "pooled.npy")))
    store = CaptionStore(None, device, info={k: info[k] for k in ("name", "token_dim", "pooled_dim", "max_length")})
    store.index = {c: i for i, c in enumerate(info["captions"])}
    store.table = emb.to(device)
    log.info("loaded %d cached caption embeddings from %s", len(store), directory)
    return store
