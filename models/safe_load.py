"""Reading ``torch.save`` files without running code from them.

A pickle can name any Python callable and have it called while it is read, so a checkpoint
downloaded from the internet can run a shell command when an unrestricted ``torch.load``
(``weights_only`` switched off) opens it. Every file the project reads goes through
:func:`load_torch_file`: ``torch.load`` with ``weights_only=True`` (tensors, numbers, strings,
lists, tuples, dicts only), plus an explicit allow-list the caller names. Whatever else a file asks
for is refused before anything is built, and a truncated or foreign file gives an error that names
it and says what was expected instead of a zip or pickle traceback."""

from __future__ import annotations

import os
import pickle
import re
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


class CheckpointFileError(ValueError):
    """A file that is not what the caller expected: missing parts, truncated, or another format."""


class UnsafeCheckpointError(CheckpointFileError):
    """A file that asks the unpickler for something other than plain data (it could run code)."""


def numpy_array_globals() -> list:
    """What a pickled numpy array needs (the RNG state of checkpoints before format 3): the array
    type, its dtype classes and the reconstructor, under its numpy 1 and numpy 2 module names.
    None of them calls anything a file names; the array's items are read by the same restricted
    unpickler."""
    reconstruct = np._core.multiarray._reconstruct
    return [
        np.ndarray,
        np.dtype,
        np.dtypes.UInt32DType,
        (reconstruct, "numpy.core.multiarray._reconstruct"),
        (reconstruct, "numpy._core.multiarray._reconstruct"),
    ]


def _refusal(path: Path, what: str, message: str) -> UnsafeCheckpointError:
    name, opcode = re.search(r"GLOBAL ([\w.]+)", message), re.search(r"Unsupported operand (\d+)", message)
    detail = (
        f" (it asks for {name.group(1)})"
        if name
        else f" (it uses pickle opcode {opcode.group(1)}, which plain data does not need)"
        if opcode
        else ""
    )
    return UnsafeCheckpointError(
        f"refused to load {path}: it holds more than tensors and plain data{detail}, so it is not a {what}; a file "
        "like this can run code when unpickled, so it was not unpickled. Use a model folder (model.safetensors + "
        "config.json, written by main_sample.py --export_dir) or a checkpoint from a source you trust"
    )


def load_torch_file(
    path: str | os.PathLike, what: str, map_location: str | torch.device = "cpu", allowed: Sequence[Any] = ()
) -> Any:
    """``torch.load(path, weights_only=True)`` with ``allowed`` added to the safe globals for this
    call only. ``what`` names the expected content in errors ("JEPA-T checkpoint", "KL-16 VAE file").

    Raises FileNotFoundError, :class:`UnsafeCheckpointError` (the file asks for code or objects
    outside the allow-list: nothing of it was run) or :class:`CheckpointFileError` (truncated,
    corrupt or another kind of file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {what} at {path}")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):
        raise CheckpointFileError(
            f"{path} is truncated or corrupt ({size} bytes): a zip archive without its "
            f"directory, so not a complete {what}; was the download or copy cut short?"
        )
    if not zipfile.is_zipfile(path) and not head.startswith(b"\x80"):
        raise CheckpointFileError(
            f"{path} is not a {what}: expected a file written by torch.save (a zip archive), "
            f"found {size} bytes starting with {head!r}"
        )
    try:
        # a zip-format file is memory-mapped: tensors are read from the page cache as they are used,
        # so loading a 1.4B-parameter checkpoint does not first copy all of it into process memory
        mmap = zipfile.is_zipfile(path)
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise _refusal(path, what, str(e)) from None
        raise CheckpointFileError(f"{path} is not a readable {what} ({size} bytes): {e}") from None
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        reason = str(e).split(". ")[0] if str(e) else type(e).__name__
        raise CheckpointFileError(
            f"{path} is truncated or corrupt ({size} bytes; expected a complete {what} as "
            f"torch.save writes it): {reason}"
        ) from None
