"""The caption store: the model's caption embeddings, computed once per unique caption so the
training step never runs the frozen text encoder for a caption it has seen.

Two sources behind one ``lookup``: a bounded in-memory cache of encoded captions (least recently
used first out; for ``shapes``, ImageNet's 1000 prompts, evaluation prompts and raw caption data),
and, for training from a latent cache, the cache's caption table on disk (``caption_table.py``),
read per batch by row (the loader gathers them for training). Memory does not grow with the
number of unique captions beyond ``capacity`` rows.

How a run's captions are embedded is a small dictionary (``caption_recipe``) stored in every
checkpoint, so sampling and evaluation rebuild the same store from the checkpoint alone.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.text_encoders import TextEmbeddings, TextEncoder, build_text_encoder
from util.data.caption_table import CaptionTable
from util.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_CAPACITY = 100_000  # encoded captions kept in memory (MiniLM, 16 tokens: ~1.3 GB in float32)
Captions = Sequence[str] | torch.Tensor  # strings, or row ids of the caption table


class CaptionStore:
    """Caption -> embeddings. ``lookup`` takes strings (encoded once and kept, at most ``capacity``
    of them, least recently used out) or, with a ``table``, a LongTensor of its row ids.

    ``info``: the encoder's name, token_dim, pooled_dim and max_length (what the model is built for).
    ``recipe``: how to build the encoder when a cached store meets a caption it does not hold.
    """

    def __init__(
        self,
        encoder: TextEncoder | None,
        device: torch.device | str = "cpu",
        encode_batch_size: int = 256,
        info: dict[str, Any] | None = None,
        recipe: dict[str, Any] | None = None,
        table: CaptionTable | None = None,
        capacity: int = DEFAULT_CAPACITY,
    ) -> None:
        if encoder is None and info is None:
            raise ValueError("a CaptionStore needs an encoder or the info of the encoder its cache came from")
        self.encoder, self.recipe, self.table = encoder, recipe, table
        self.device = torch.device(device)
        self.encode_batch_size, self.capacity = encode_batch_size, capacity
        self.info = info or {
            "name": encoder.name,
            "token_dim": encoder.token_dim,
            "pooled_dim": encoder.pooled_dim,
            "max_length": encoder.max_length,
        }
        self.index: OrderedDict[str, int] = OrderedDict()  # caption -> slot, least recently used first
        self.slots: TextEmbeddings | None = None  # [at most capacity, ...] on the device
        self.used = 0  # slots filled so far

    def __len__(self) -> int:
        return len(self.index) + (len(self.table) if self.table is not None else 0)

    def known(self, captions: Sequence[str]) -> list[bool]:
        """Whether each caption is held already (in memory or in the table)."""
        in_table = self.table.find(captions) >= 0 if self.table is not None else [False] * len(captions)
        return [c in self.index or bool(t) for c, t in zip(captions, in_table)]

    def _table_rows(self, captions: Sequence[str]) -> dict[str, int]:
        """Table row of each caption not held in memory that the table holds."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.index]
        if self.table is None or not missing:
            return {}
        return {c: int(r) for c, r in zip(missing, self.table.find(missing)) if r >= 0}

    def add(self, captions: Sequence[str], in_table: dict[str, int] | None = None) -> None:
        """Encode the captions held neither in memory nor in the table (in batches) and keep them,
        evicting the least recently used beyond ``capacity``. ``in_table``: ``_table_rows`` of them."""
        in_table = self._table_rows(captions) if in_table is None else in_table
        new = [c for c in dict.fromkeys(captions) if c not in self.index and c not in in_table]
        if not new:
            return
        if len(new) > self.capacity:
            raise ValueError(f"{len(new)} new captions exceed the store's capacity of {self.capacity}")
        if self.encoder is None:
            raise KeyError(
                f"{len(new)} caption(s) are not in the cached text embeddings (e.g. {new[0]!r}); "
                "run main_cache.py over them, or pass prompts the cache holds"
            )
        for i in range(0, len(new), self.encode_batch_size):
            self._store(new[i : i + self.encode_batch_size], self.encoder.encode(new[i : i + self.encode_batch_size]))

    def _store(self, captions: list[str], emb: TextEmbeddings) -> None:
        """Put a batch of new embeddings into free slots (the buffer grows by doubling up to
        ``capacity``), then into the slots of the least recently used captions."""
        emb, n = emb.to(self.device), len(captions)
        fresh = min(n, self.capacity - self.used)
        slots = list(range(self.used, self.used + fresh))
        slots += [self.index.popitem(last=False)[1] for _ in range(n - fresh)]  # evict, oldest first
        self._reserve(self.used + fresh, emb)
        self.used += fresh
        idx = torch.tensor(slots, device=self.device)
        self.slots.tokens[idx], self.slots.mask[idx], self.slots.pooled[idx] = emb.tokens, emb.mask, emb.pooled
        self.index.update(zip(captions, slots))

    def _reserve(self, rows: int, like: TextEmbeddings) -> None:
        have = 0 if self.slots is None else len(self.slots)
        if rows <= have:
            return
        size = min(self.capacity, max(rows, 2 * have, 64))
        grown = TextEmbeddings(
            like.tokens.new_zeros((size,) + like.tokens.shape[1:]),
            like.mask.new_zeros((size,) + like.mask.shape[1:]),
            like.pooled.new_zeros((size,) + like.pooled.shape[1:]),
        )
        if self.slots is not None:
            grown.tokens[:have], grown.mask[:have], grown.pooled[:have] = (
                self.slots.tokens,
                self.slots.mask,
                self.slots.pooled,
            )
        self.slots = grown

    def lookup(self, captions: Captions) -> TextEmbeddings:
        """Embeddings of a batch: tokens [B,S,Dt], mask [B,S], pooled [B,Du] on the device."""
        if isinstance(captions, torch.Tensor):
            if self.table is None:
                raise ValueError("caption row ids need the latent cache's caption table")
            return self.table.rows(captions, self.device)
        captions = list(captions)
        if len(set(captions)) > self.capacity:
            raise ValueError(
                f"a batch of {len(set(captions))} captions exceeds the store's capacity of {self.capacity}"
            )
        for c in captions:  # the batch's own captions are the most recent: it never evicts them
            if c in self.index:
                self.index.move_to_end(c)
        in_table = self._table_rows(captions)  # one search of the table per batch
        self.add(captions, in_table)
        held = [c in self.index for c in captions]
        if all(held):
            return self.slots[torch.tensor([self.index[c] for c in captions], device=self.device)]
        # the others are in the table: add() encoded only what neither holds
        rows = torch.tensor([in_table[c] for c, h in zip(captions, held) if not h], dtype=torch.long)
        from_table = self.table.rows(rows, self.device)
        if not any(held):
            return from_table
        emb = self.slots[torch.tensor([self.index.get(c, 0) for c in captions], device=self.device)]
        m = torch.tensor([not h for h in held], device=self.device)
        emb.tokens[m], emb.mask[m], emb.pooled[m] = from_table.tokens, from_table.mask, from_table.pooled
        return emb

    def require(self, captions: Sequence[str]) -> None:
        """Make sure every caption can be looked up. Captions missing from a cached store are
        encoded by the text encoder its recipe names, built now; when it cannot be built, stop now,
        naming the captions and the flag, rather than with a KeyError in the middle of a run."""
        unique = list(dict.fromkeys(captions))
        missing = [c for c, k in zip(unique, self.known(unique)) if not k]
        if not missing or self.encoder is not None:
            return
        name = self.info["name"]
        if self.recipe is None:
            raise UserError(
                f"{len(missing)} caption(s) are not in the cached text embeddings (e.g. {missing[0]!r}) "
                "and no text encoder is known to encode them"
            )
        try:
            encoder = text_encoder(self.recipe, self.device)
        except (OSError, RuntimeError, ValueError) as e:
            raise UserError(
                f"{len(missing)} prompt(s) are not in the cached caption embeddings (e.g. {missing[0]!r}) "
                f"and the text encoder {name!r} that would encode them cannot be built ({e}); pass its "
                "weights with --text_encoder_path, or use prompts the cache holds"
            ) from None
        have = (encoder.token_dim, encoder.pooled_dim, encoder.max_length)
        want = (self.info["token_dim"], self.info["pooled_dim"], self.info["max_length"])
        if have != want:
            raise UserError(
                f"text encoder {name!r} gives (token width, pooled width, length) {have}, but the cached "
                f"embeddings have {want}; pass the encoder the cache was made with"
            )
        log.info("%d prompt(s) are not in the caption cache (e.g. %r): %s encodes them", len(missing), missing[0], name)
        self.encoder = encoder

    def sample_captions(self, count: int) -> list[str]:
        """Up to ``count`` held captions, spread over what is held (for sample grids)."""
        if self.table is not None:
            n = len(self.table)
            return [self.table.caption(r) for r in range(0, n, max(1, n // count))][:count]
        held = list(self.index)
        return held[:: max(1, len(held) // count)][:count]


# ------------------------------------------------------------------ how a run embeds its captions
def caption_recipe(
    dataset: str,
    data_path: str,
    text_encoder: str,
    clip_model: str,
    text_encoder_path: str | None,
    text_max_length: int,
) -> dict[str, Any]:
    """The dictionary a checkpoint keeps of how its training captions were made and embedded."""
    return {
        "dataset": dataset,
        "data_path": data_path,
        "text_encoder": text_encoder,
        "clip_model": clip_model,
        "text_encoder_path": text_encoder_path,
        "text_max_length": text_max_length,
    }


def text_cache_key(encoder: str, max_length: int | None, clip_model: str = "", path: str | None = None) -> str:
    """Folder name of a text-embedding cache: the encoder and everything that changes its output."""
    parts = [encoder]
    if encoder == "clip":
        parts += [clip_model, os.path.basename(str(path or "openai")).replace(".", "_")]
    parts.append(f"len{max_length or 'default'}")
    return "-".join(p.replace("/", "_") for p in parts)


def cached_text_dir(recipe: dict[str, Any]) -> Path | None:
    """Where a latent cache keeps this encoder's caption embeddings (None unless the dataset is ``cached``)."""
    if recipe["dataset"] != "cached":
        return None
    key = text_cache_key(
        recipe["text_encoder"], recipe["text_max_length"], recipe["clip_model"], recipe["text_encoder_path"]
    )
    return Path(recipe["data_path"]) / "text" / key


def text_encoder(recipe: dict[str, Any], device: torch.device | str) -> TextEncoder:
    """The frozen text encoder a caption recipe names."""
    return build_text_encoder(
        recipe["text_encoder"],
        path=recipe["text_encoder_path"],
        clip_model=recipe["clip_model"],
        max_length=recipe["text_max_length"] or None,
        device=str(device),
    )


def build_caption_store(recipe: dict[str, Any], device: torch.device, use_cache: bool = True) -> CaptionStore:
    """Over a latent cache's caption table when it holds one and ``use_cache`` (the text encoder is
    then built only if a caption outside the table is required), else over the text encoder the
    recipe names."""
    text_dir = cached_text_dir(recipe) if use_cache else None
    if text_dir is not None and (text_dir / "table.json").is_file():
        table = CaptionTable(text_dir)
        info = {k: table.info[k] for k in ("name", "token_dim", "pooled_dim", "max_length")}
        log.info("caption embeddings of %d captions from %s", len(table), text_dir)
        return CaptionStore(None, device, info=info, recipe=recipe, table=table)
    if text_dir is not None:
        log.info("no caption table in %s: captions are encoded as they come (main_cache.py writes one)", text_dir)
    return CaptionStore(text_encoder(recipe, device), device, recipe=recipe)


def check_widths(store: CaptionStore, token_dim: int, pooled_dim: int, source: str) -> None:
    """The store's embeddings must have the widths the model was built for."""
    have = (store.info["token_dim"], store.info["pooled_dim"])
    if have != (token_dim, pooled_dim):
        raise UserError(
            f"text encoder {store.info['name']} gives widths {have} but {source} was trained with "
            f"{(token_dim, pooled_dim)}; pass the same encoder (--text_encoder_path)"
        )
