"""Sharded checkpoints for FSDP2: every rank writes its own shards with torch.distributed.checkpoint
(DCP), so nothing is gathered on rank 0 and no rank holds the full state, and a resume with FSDP
reads each rank's shards back (any world size: DCP reshards). Every other reader (sampling,
``--evaluate``, model folders, a DDP resume, :func:`convert`) gets the plain checkpoint dictionary
that ``checkpoint-*.pth`` files hold, assembled in one process.

A sharded checkpoint is a folder ``checkpoint-<tag>.dcp/``::

    .metadata, __<rank>_0.distcp    DCP's files: model, EMA and AdamW moments, tensors only
    record.pth                      everything else (config, counters, RNG, optimizer groups),
                                    read with ``weights_only=True`` like a plain checkpoint

DCP pickles its ``.metadata``; it is read here by an unpickler that builds only DCP's own metadata
classes, and a folder whose metadata lists non-tensor entries (which DCP would unpickle) is
refused, so a sharded checkpoint from outside runs no code either.

Convert one to a plain file (offline, one process, no GPU)::

    python -m util.training.checkpoint --convert output/run/checkpoint-last.dcp output/run/checkpoint-last.pth
"""

from __future__ import annotations

import os
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from models.safe_load import CheckpointFileError, load_torch_file, numpy_array_globals
from util.training.parallel import clean_fqn

SUFFIX = ".dcp"
RECORD = "record.pth"
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": None,  # any of DCP's metadata classes
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {
        "Size",
        *(
            str(t).removeprefix("torch.")
            for t in (
                torch.float64,
                torch.float32,
                torch.float16,
                torch.bfloat16,
                torch.int64,
                torch.int32,
                torch.int16,
                torch.int8,
                torch.uint8,
                torch.bool,
                torch.complex64,
                torch.complex128,
            )
        ),
    },  # fmt: skip
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath"},  # Python 3.13+
    "collections": {"OrderedDict"},
}


def is_sharded(path: str | os.PathLike) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        allowed = _ALLOWED.get(module, set())
        refused = CheckpointFileError(f"the sharded checkpoint's metadata names {module}.{name}, which is not DCP's")
        if module not in _ALLOWED or "." in name or (allowed is not None and name not in allowed):
            raise refused  # (a dotted name would reach into what the module imports, os.system say)
        found = super().find_class(module, name)
        if allowed is None and not (isinstance(found, type) and found.__module__ == module):
            raise refused  # of DCP's metadata module: its own classes only
        return found


def read_metadata(folder: Path):
    """DCP's metadata of ``folder``, unpickled without running code; refused when it lists
    non-tensor entries (which DCP would unpickle freely)."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with open(folder / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError) as e:
        raise CheckpointFileError(f"{folder}/.metadata is not DCP metadata ({e})") from None
    entries = getattr(metadata, "state_dict_metadata", None)
    if not isinstance(entries, dict):
        raise CheckpointFileError(f"{folder}/.metadata is not DCP metadata")
    objects = [k for k, v in entries.items() if isinstance(v, BytesStorageMetadata)]
    if objects:
        raise CheckpointFileError(
            f"{folder} holds non-tensor entries ({objects[:3]}), which this framework never writes"
        )
    return metadata


def _reader(folder: Path):
    """A DCP FileSystemReader whose metadata is read by :func:`read_metadata`."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    read_metadata(folder)  # refused here, with its own message, before DCP reads anything

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any):
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(folder)


# -------------------------------------------------------------------- writing (every rank)
def save_sharded(folder: Path, parallel, optimizer: torch.optim.Optimizer, record: dict[str, Any]) -> float:
    """Write ``folder`` (a collective): each rank its shards of the model, EMA and AdamW state, rank 0
    ``record``; atomically (a temporary folder renamed when every rank is done). Returns seconds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    t0, env = time.perf_counter(), parallel.env
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    if env.is_main:  # what a killed save left behind (of any tag) goes first
        for stale in [*folder.parent.glob(".checkpoint-*.dcp.tmp"), *folder.parent.glob(".checkpoint-*.dcp.link")]:
            shutil.rmtree(stale, ignore_errors=True)
        recover(folder)
        shutil.rmtree(old, ignore_errors=True)
    env.barrier()
    osd = get_optimizer_state_dict(parallel.model, optimizer)
    state = {
        "model": get_model_state_dict(parallel.model),
        "ema": get_model_state_dict(parallel.ema),
        "optimizer": osd["state"],  # tensors only; the groups (numbers) go to the record
    }
    dcp.save(state, checkpoint_id=tmp)
    if env.is_main:
        groups = [{**g, "params": [clean_fqn(k) for k in g["params"]]} for g in osd["param_groups"]]
        with open(tmp / RECORD, "wb") as f:
            torch.save({**record, "optimizer_param_groups": groups}, f)
            f.flush()
            os.fsync(f.fileno())
        _swap(tmp, folder)
    env.barrier()
    return time.perf_counter() - t0


def link_copy(src: Path, dst: Path) -> None:
    """``dst`` becomes ``src`` under another name: a folder of hard links (copies where the file
    system has none), swapped in atomically for a reader of the folder name."""
    tmp = dst.with_name(f".{dst.name}.link")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for f in src.iterdir():
        try:
            os.link(f, tmp / f.name)
        except OSError:
            shutil.copyfile(f, tmp / f.name)
    _swap(tmp, dst)


def _swap(new: Path, folder: Path) -> None:
    """``new`` takes the place of ``folder``. Two renames (a folder cannot be replaced in one): a
    kill between them leaves ``.<name>.old``, which :func:`recover` puts back."""
    old = folder.with_name(f".{folder.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if folder.exists():
        os.replace(folder, old)
    os.replace(new, folder)
    shutil.rmtree(old, ignore_errors=True)


def recover(folder: Path) -> None:
    """Put back ``folder`` from ``.<name>.old`` when a save was killed between its two renames."""
    old = folder.with_name(f".{folder.name}.old")
    if not folder.exists() and is_sharded(old):
        os.replace(old, folder)


# -------------------------------------------------------------------- reading
def read_record(folder: Path) -> dict[str, Any]:
    """The non-tensor part of a sharded checkpoint (config, counters, RNG, optimizer groups)."""
    if not (folder / RECORD).is_file():
        raise CheckpointFileError(f"{folder} has no {RECORD}: not a sharded checkpoint written by main_jepat.py")
    return load_torch_file(folder / RECORD, "sharded checkpoint record", "cpu", allowed=numpy_array_globals())


def load_into(folder: Path, parallel, optimizer: torch.optim.Optimizer) -> None:
    """FSDP resume: every rank reads its shards (DCP reshards to this world size) into the sharded
    model, EMA and optimizer (the optimizer groups' numbers come from the record)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    record = read_record(folder)
    osd = get_optimizer_state_dict(parallel.model, optimizer)
    state = {
        "model": get_model_state_dict(parallel.model),
        "ema": get_model_state_dict(parallel.ema),
        "optimizer": osd["state"],
    }
    dcp.load(state, checkpoint_id=folder, storage_reader=_reader(folder))
    set_model_state_dict(parallel.model, state["model"])
    set_model_state_dict(parallel.ema, state["ema"])
    names = {clean_fqn(k): k for g in osd["param_groups"] for k in g["params"]}
    groups = [{**g, "params": [names[k] for k in g["params"]]} for g in record["optimizer_param_groups"]]
    set_optimizer_state_dict(parallel.model, optimizer, {"state": state["optimizer"], "param_groups": groups})


def read_sharded(folder: str | os.PathLike) -> dict[str, Any]:
    """The plain checkpoint dictionary of a sharded one, assembled in this process (no process group):
    what ``load_checkpoint`` returns for a ``.dcp`` folder."""
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    folder = Path(folder)
    record = read_record(folder)
    state: dict[str, Any] = {}
    _load_state_dict(state, storage_reader=_reader(folder), planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    groups = record.pop("optimizer_param_groups")
    index = {name: i for i, name in enumerate(n for g in groups for n in g["params"])}  # the optimizer's order
    optimizer = {
        "state": {index[clean_fqn(k)]: v for k, v in state["optimizer"].items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups],
    }
    return {
        **record,
        "model": {clean_fqn(k): v for k, v in state["model"].items()},
        "ema": {clean_fqn(k): v for k, v in state["ema"].items()},
        "optimizer": optimizer,
    }
