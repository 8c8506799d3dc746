"""Preflight: everything a run needs later, checked at start-up on every rank, before the first
step, so that a run never fails after training for something it could have checked."""
from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from util.evaluation.evaluate import EvalOptions, check_options
from util.errors import UserError

log = logging.getLogger(__name__)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Size of one training checkpoint: model, EMA and AdamW's two moments, in float32."""
    return 4 * 4 * sum(p.numel() for p in model.parameters())


def preflight(out_dir: Path, needed_bytes: int, options: Optional[EvalOptions]) -> None:
    """The evaluation's weights and references (``options``: the evaluation that will run, if it
    generates from prompts), a writable output folder, and free disk for one checkpoint."""
    if options is not None and options.prompts is not None:
        try:
            check_options(options)
        except (FileNotFoundError, ValueError) as e:   # a message, not a traceback: nothing has run yet
            raise UserError(f"preflight: {e}") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".preflight."):
            pass
    except OSError as e:
        raise UserError(f"the output folder {out_dir} is not writable ({e}); pass another --output_dir") from None
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes:
        raise UserError(f"{out_dir} has {free / 2**30:.2f} GiB free but one checkpoint needs "
                         f"{needed_bytes / 2**30:.2f} GiB; free some space or pass another --output_dir")
    log.info("preflight passed: %s writable, %.1f GiB free for checkpoints of %.2f GiB", out_dir, free / 2**30,
             needed_bytes / 2**30)
