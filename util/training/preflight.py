"""Preflight: everything a run needs later, checked at start-up on every rank, before the first
step, so that a run never fails after training for something it could have checked."""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path

import torch

from util.errors import UserError
from util.evaluation.evaluate import EvalOptions, check_options

log = logging.getLogger(__name__)


def checkpoint_bytes(model: torch.nn.Module) -> int:
    """Size of one training checkpoint: model, EMA and AdamW's two moments, in float32."""
    return 4 * 4 * sum(p.numel() for p in model.parameters())


def disk_plan(checkpoint: int, files: dict[str, int]) -> str:
    """'5 checkpoints of 3.46 GiB (last 1, recent 2, milestones 1, being written 1) = 17.30 GiB'."""
    n = sum(files.values())
    parts = ", ".join(f"{k} {v}" for k, v in files.items())
    return f"{n} checkpoints of {checkpoint / 2**30:.2f} GiB ({parts}) = {n * checkpoint / 2**30:.2f} GiB"


def preflight(out_dir: Path, checkpoint: int, options: EvalOptions | None, files: dict[str, int] | None = None) -> None:
    """The evaluation's weights and references (``options``: the evaluation that will run, if it
    generates from prompts), a writable output folder, and free disk for every checkpoint the run's
    policy will hold at once (``files``: by kind, from ``CheckpointPolicy.peak_files``; checkpoints
    already in the folder count as room, since the policy replaces or removes them)."""
    if options is not None and options.prompts is not None:
        try:
            check_options(options)
        except (FileNotFoundError, ValueError) as e:  # a message, not a traceback: nothing has run yet
            raise UserError(f"preflight: {e}") from None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".preflight."):
            pass
    except OSError as e:
        raise UserError(f"the output folder {out_dir} is not writable ({e}); pass another --output_dir") from None
    files = files or {"checkpoint": 1 if checkpoint else 0}
    needed = checkpoint * sum(files.values())
    present = sum(p.stat().st_size for p in out_dir.glob("checkpoint-*.pth") if p.stat().st_nlink == 1)
    present += sum(
        {p.stat().st_ino: p.stat().st_size for p in out_dir.glob("checkpoint-*.pth") if p.stat().st_nlink > 1}.values()
    )
    free = shutil.disk_usage(out_dir).free
    if free + present < needed:
        raise UserError(
            f"{out_dir} has {free / 2**30:.2f} GiB free (+{present / 2**30:.2f} GiB of checkpoints the run "
            f"will replace) but the checkpoint policy needs {disk_plan(checkpoint, files)}; free some "
            "space, pass another --output_dir, or lower runtime.keep_last / raise runtime.milestone_every"
        )
    log.info("preflight passed: %s writable, %.1f GiB free for %s", out_dir, free / 2**30, disk_plan(checkpoint, files))
