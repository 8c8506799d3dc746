"""Preflight: everything a run needs later, checked at start-up on every rank, before the first
step, so that a run never fails after training for something it could have checked."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
from pathlib import Path

import torch

from util.errors import UserError
from util.evaluation.evaluate import EvalOptions, check_options
from util.runtime import DistEnv
from util.training.sharded import recover

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


def check_shared_folder(out_dir: Path, env: DistEnv) -> None:
    """Every rank must see the run folder rank 0 writes (checkpoints, evaluation samples, logs): rank 0
    writes a token there and every rank reads it back. Nodes that do not share the folder (no network
    file system mounted at the same path) fail here, at start-up, not at the first resume."""
    if env.world_size == 1:
        return
    token = env.from_rank0(secrets.token_hex(8))
    probe = out_dir / f".shared-{token}"
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    env.barrier()
    seen = probe.is_file() and probe.read_text() == token
    everyone = env.all_ranks(seen)
    env.barrier()
    if env.is_main:
        probe.unlink(missing_ok=True)
    if not everyone:
        raise UserError(
            f"the output folder {out_dir} is not shared by all ranks (rank {env.rank} "
            f"{'sees' if seen else 'does not see'} what rank 0 wrote there): put --output_dir on a file system "
            "every node mounts at the same path"
        )


def resume_auto(out_dir: Path, env: DistEnv) -> str:
    """``--resume auto``: rank 0 decides, from its view of the run folder, and every rank follows
    (``checkpoint-last.pth`` or the sharded ``checkpoint-last.dcp``, the newer when both are there;
    else a fresh start)."""
    if env.is_main:
        recover(out_dir / "checkpoint-last.dcp")  # a save killed between its two renames
    found = [p for p in (out_dir / "checkpoint-last.pth", out_dir / "checkpoint-last.dcp") if p.exists()]
    newest = max(found, key=lambda p: p.stat().st_mtime, default=None)  # the format may have changed
    return env.from_rank0(str(newest) if env.is_main and newest is not None else "")
