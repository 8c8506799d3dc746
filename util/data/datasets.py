"""Training data: dataset registry and a resumable, rank-aware sampler.

A dataset item is ``(image [3,H,W] float in [-1,1], caption str)``; for ``cached`` it is
``(latent [c,h,w], caption str)`` read from a main_cache.py folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import Dataset, Sampler

from util.data.draws import ItemKey, draw_seed
from util.data.image_folders import CaptionOrigin, RawImageDataset, list_class_folders, list_manifest
from util.data.latent_cache import CachedLatentDataset, read_meta
from util.data.pairs import PairsDataset
from util.data.shapes import ShapesDataset
from util.data.tar_shards import list_tar_shards
from util.errors import UserError


class DataSettingError(UserError, ValueError):
    """A data setting the chosen set cannot take (ends a script with its one line, not a traceback)."""


def _procedural(kind: type, img_size: int, num_samples: int, seed: int) -> Dataset:
    """A built-in set drawn from a seed; the arguments it refuses are the user's data settings."""
    try:
        return kind(split="train", num_samples=num_samples, resolution=img_size, seed=seed)
    except ValueError as e:
        raise DataSettingError(
            f"{kind.__name__} with data.img_size={img_size}, data.num_samples={num_samples}, seed={seed}: {e}"
        ) from None


def _shapes(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del data_path  # procedural: nothing to read
    if flip:
        raise DataSettingError("the shapes set draws its own positions; --random_flip does not apply to it")
    return _procedural(ShapesDataset, img_size, num_samples, seed)


def _pairs(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del data_path  # procedural: nothing to read
    if flip:
        raise DataSettingError("the pairs set's captions name left and right; --random_flip does not apply to it")
    return _procedural(PairsDataset, img_size, num_samples, seed)


def _imagenet(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del num_samples, seed  # the files decide
    return RawImageDataset(list_class_folders(data_path), img_size, flip=True if flip is None else flip)


def _captions(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del num_samples, seed  # the files decide
    return RawImageDataset(list_manifest(data_path), img_size, flip=bool(flip))


def _webdataset(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del num_samples, seed  # the shards decide
    return RawImageDataset(list_tar_shards(data_path), img_size, flip=bool(flip))


def _cached(data_path: str, img_size: int, num_samples: int, seed: int, flip: bool | None) -> Dataset:
    del img_size, num_samples, seed  # the cache decides (main_jepat checks its resolution)
    return CachedLatentDataset(data_path, flip)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "shapes": _shapes,
    "pairs": _pairs,
    "imagenet": _imagenet,
    "captions": _captions,
    "webdataset": _webdataset,
    "cached": _cached,
}


def build_dataset(
    name: str,
    data_path: str = "",
    img_size: int = 32,
    num_samples: int = 20000,
    seed: int = 0,
    flip: bool | None = None,
) -> Dataset:
    """``flip``: random horizontal flips; None takes the dataset's convention (on for class
    folders, as MAR does; off for captions, which may say "left" or hold text)."""
    if name not in DATASETS:
        raise DataSettingError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return DATASETS[name](data_path, img_size, num_samples, seed, flip)


# the built-in procedural sets; each brings its own judged evaluation (util/evaluation/shapes_eval.py,
# util/evaluation/pairs_eval.py), named as the set
BUILTIN_SETS: tuple[str, ...] = ("shapes", "pairs")


def builtin_eval_of(origin: CaptionOrigin) -> str | None:
    """The built-in evaluation of a run whose captions were made as ``origin`` says (``shapes``,
    ``pairs``), or None when its dataset has none."""
    return origin.kind if origin.kind in BUILTIN_SETS else None


def builtin_eval(dataset: str, data_path: str) -> str | None:
    """The built-in evaluation (``shapes``, ``pairs``) of a run that trains on ``dataset``
    (directly, or from a latent cache of a built-in set), or None when the data has none."""
    if dataset in BUILTIN_SETS:
        return dataset
    if dataset != "cached":
        return None
    meta = read_meta(data_path)
    kind = CaptionOrigin.from_dict(meta.get("caption_source")).kind
    if kind in BUILTIN_SETS:
        return kind
    root = str(meta.get("root", ""))  # caches made before the caption source was recorded
    return next((name for name in BUILTIN_SETS if root.startswith(f"{name}(")), None)


class DataOrder(Sampler[ItemKey]):
    """Shuffled indices, one permutation per (seed, epoch), split across ranks, that can start
    part-way through an epoch (``set_position``) so a resumed run sees exactly the data an
    uninterrupted one would have seen. Drops the tail so every rank gets the same count. Yields
    ``ItemKey(index, draw seed)``: the item's random draws are a function of (seed, epoch, index)
    (util/data/draws.py), whatever the rank or loader worker that reads it.
    """

    def __init__(
        self, dataset_len: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1, shuffle: bool = True
    ) -> None:
        self.n, self.batch_size, self.seed = dataset_len, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.epoch, self.start_batch = 0, 0
        self.num_batches = dataset_len // (batch_size * world_size)
        if self.num_batches == 0:
            raise ValueError(
                f"dataset of {dataset_len} items is smaller than one global batch "
                f"({batch_size} x {world_size} ranks); lower --batch_size"
            )

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start_batch = epoch, 0

    def set_position(self, epoch: int, batch_in_epoch: int) -> None:
        self.epoch, self.start_batch = epoch, batch_in_epoch

    def __iter__(self) -> Iterator[ItemKey]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            perm = torch.randperm(self.n, generator=g)
        else:
            perm = torch.arange(self.n)
        per_rank = self.num_batches * self.batch_size
        mine = perm[: per_rank * self.world_size].view(self.num_batches, self.world_size, self.batch_size)
        mine = mine[self.start_batch :, self.rank].reshape(-1)
        return self._keys(mine, self.seed, self.epoch)

    def _keys(self, mine: torch.Tensor, seed: int, epoch: int) -> Iterator[ItemKey]:
        """The keys made a batch at a time: the epoch's order stays one int64 tensor (8 bytes an
        item), not a list of Python objects that forked loader workers would copy as it changes."""
        for start in range(0, len(mine), self.batch_size):  # (split() would make every view at once)
            yield from (ItemKey(i, draw_seed(seed, epoch, i)) for i in mine[start : start + self.batch_size].tolist())

    def __len__(self) -> int:
        return (self.num_batches - self.start_batch) * self.batch_size
