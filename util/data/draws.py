"""The data path's randomness as a pure function of (seed, epoch, global item index).

``DataOrder`` yields an ``ItemKey`` per item: its index and the seed of every random draw made
for it (horizontal flip, posterior noise of a cached latent, which caption of its group). So the
draws do not depend on the rank, the loader worker or how many of them there are, two ranks never
repeat each other's draws, and a resumed run (any world size, any ``num_workers``) draws what the
uninterrupted one drew for the same item in the same epoch.
"""

from __future__ import annotations

import numbers
from typing import NamedTuple

import torch


class ItemKey(NamedTuple):
    index: int  # the item in the dataset
    seed: int  # seeds the item's draws: draw_seed(run seed, epoch, index)


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit mix of (seed, epoch, index) (splitmix64's finaliser)."""
    x = (seed * 0x9E3779B97F4A7C15 + epoch * 0xD1B54A32D192ED03 + index * 0x94D049BB133111EB + 1) & (2**64 - 1)
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & (2**64 - 1)
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & (2**64 - 1)
    return (x ^ (x >> 31)) & (2**63 - 1)


def item_key(key: ItemKey | int) -> ItemKey:
    """An ``ItemKey`` as given, or for a plain index (direct indexing, not through ``DataOrder``)
    the key of that index in epoch 0 of seed 0."""
    if isinstance(key, ItemKey):
        return key
    return ItemKey(int(key), draw_seed(0, 0, int(key)))


def item_generator(key: ItemKey) -> torch.Generator:
    """A CPU generator for the draws of one item."""
    return torch.Generator().manual_seed(key.seed)


def item_index(i: ItemKey | int, num_items: int) -> int:
    """The item of an index (negative ones count from the end) or of an ``ItemKey``, checked
    against the set's size."""
    if isinstance(i, ItemKey):
        i = i.index
    if not isinstance(i, numbers.Integral):  # int or a numpy integer
        raise TypeError(f"index must be an int, got {type(i).__name__}")
    j = int(i) + num_items if i < 0 else int(i)
    if not 0 <= j < num_items:
        raise IndexError(f"index {i} out of range for {num_items} samples")
    return j
