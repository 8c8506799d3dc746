"""Where a run's scalars, sample grids and evaluation figures go: TensorBoard (the default) and/or
Weights & Biases, chosen with ``--log_with tensorboard,wandb``.

``RunLogger`` has the three calls of TensorBoard's ``SummaryWriter`` that the project uses
(``add_scalar``, ``add_image``, ``add_text``) and sends each to every chosen backend, so training
and evaluation log the same values to both. This code imports wandb only when it is asked for (timm
tries ``import wandb`` on its own whenever the package is installed, and copes without it); its mode,
entity and folder follow the usual ``WANDB_*`` variables (``WANDB_MODE=offline`` keeps the run on
disk under ``$WANDB_DIR/wandb``, by default ``<output_dir>/wandb``, for a later ``wandb sync``).
"""

from __future__ import annotations

import html
import importlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

LOGGERS = ("tensorboard", "wandb")
WANDB_ID_FILE = "wandb_run_id.txt"


def parse_log_with(text: str) -> tuple[str, ...]:
    """``runtime.log_with``: a comma list of LOGGERS, or 'none'."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    if names == ("none",):
        return ()
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ValueError(
            f"runtime.log_with: unknown logger(s) {unknown}; choose from {', '.join(LOGGERS)} (comma-separated) or none"
        )
    return names


def _plain(value: Any) -> Any:
    """A JSON-safe copy of a config value (W&B's config is JSON)."""
    return json.loads(json.dumps(value, default=str))


def _hwc_uint8(image: Any, dataformats: str) -> np.ndarray:
    """An image [C,H,W] or [H,W,C], float in [0,1] or uint8, as uint8 [H,W,C]."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if dataformats == "CHW":
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
    return array


class RunLogger:
    """Scalars, images and text to TensorBoard and/or a W&B run (either may be None)."""

    def __init__(
        self, tensorboard: SummaryWriter | None = None, wandb_run: Any | None = None, wandb_module: Any | None = None
    ) -> None:
        self.tensorboard, self.wandb_run, self.wandb = tensorboard, wandb_run, wandb_module

    @classmethod
    def open(cls, backends: Sequence[str], out_dir: Path, config: dict[str, Any], project: str = "jepat") -> RunLogger:
        """The backends named (``tensorboard`` writes ``out_dir/tb``). A W&B run resumed from the
        same folder continues the same W&B run (its id is kept in ``out_dir/wandb_run_id.txt``)."""
        out_dir = Path(out_dir)
        writer = SummaryWriter(str(out_dir / "tb")) if "tensorboard" in backends else None
        if "wandb" not in backends:
            return cls(writer)
        try:
            wandb = importlib.import_module("wandb")
        except ImportError:
            raise RuntimeError(
                "runtime.log_with wandb needs the wandb package: pip install -r requirements.txt"
            ) from None
        id_file = out_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        run = wandb.init(
            project=project,
            name=out_dir.name,
            id=run_id,
            resume="allow" if run_id else None,
            dir=os.environ.get("WANDB_DIR", str(out_dir)),
            config=_plain(config),
        )
        id_file.write_text(run.id + "\n")
        log.info("logging to W&B run %s (project %s, mode %s)", run.id, project, run.settings.mode)
        return cls(writer, run, wandb)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(tag, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: float(value)}, step=step)

    def add_image(self, tag: str, image: Any, step: int, dataformats: str = "CHW") -> None:
        """``image``: [C,H,W] (``dataformats="CHW"``) or [H,W,C], floats in [0,1] or uint8."""
        if self.tensorboard is not None:
            self.tensorboard.add_image(tag, image, step, dataformats=dataformats)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: self.wandb.Image(_hwc_uint8(image, dataformats))}, step=step)

    def add_text(self, tag: str, text: str, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_text(tag, text, step)
        if self.wandb_run is not None:
            self.wandb_run.log({tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
