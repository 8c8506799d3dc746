"""Caption embeddings computed once per unique caption, so the training step never runs the
frozen text encoder for a caption it has seen (for ``shapes`` and for ImageNet's 1000 prompts
every caption is known before training starts)."""
from __future__ import annotations

import logging
from typing import Dict, List, Sequence

import torch

from models.text_encoders import TextEmbeddings, TextEncoder

log = logging.getLogger(__name__)


class TextEmbeddingTable:
    """Unique caption -> row of a stored ``TextEmbeddings``; unknown captions are encoded on
    first use and appended. Lookups return tensors on ``device``."""

    def __init__(self, encoder: TextEncoder, device: torch.device | str = "cpu",
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
