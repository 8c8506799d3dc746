"""Nothing loaded from a file runs code: checkpoints load with weights_only=True, a file crafted to
run code when unpickled is refused before anything of it runs, and truncated or foreign files get
an error that names the file and what was expected."""

from __future__ import annotations

import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from models.safe_load import CheckpointFileError, UnsafeCheckpointError, load_torch_file
from models.vae import load_kl16
from tests.helpers import tiny_model
from util.training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state

ROOT = Path(__file__).resolve().parents[1]


class CreatesMarker:
    """Unpickling this calls open(marker, "w"): the file appears if the pickle is run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


class RunsShell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    """A zip checkpoint as torch.save writes it, with every entry a JEPA-T checkpoint has, whose
    unpickling would run a shell command."""
    marker = tmp_path / "pwned"
    model = tiny_model()
    torch.save(
        {
            "format_version": 3,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "model_config": {"preset": "tiny"},
            "payload": RunsShell(marker),
        },
        tmp_path / "evil.pth",
    )
    return tmp_path / "evil.pth", marker


def test_a_crafted_checkpoint_is_refused_and_nothing_runs(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil.pth.*posix.system"):
        load_checkpoint(path)
    raw = tmp_path / "evil_raw.pth"  # a bare pickle (the legacy torch format) that would open a file
    raw.write_bytes(pickle.dumps({"model": CreatesMarker(tmp_path / "opened")}, protocol=2))
    with pytest.raises(UnsafeCheckpointError, match=r"io.open|builtins.open"):
        load_checkpoint(raw)
    with pytest.raises(UnsafeCheckpointError):
        load_kl16(str(path))  # the VAE loader goes through the same gate
    assert not marker.exists() and not (tmp_path / "opened").exists()


def test_a_crafted_sharded_checkpoint_is_refused_and_nothing_runs(tmp_path):
    """DCP pickles a sharded checkpoint's .metadata: it is read by an unpickler that builds DCP's
    own classes only, so a folder from outside runs no code either."""
    folder = tmp_path / "checkpoint-last.dcp"
    folder.mkdir()
    marker = tmp_path / "pwned"
    (folder / ".metadata").write_bytes(pickle.dumps(RunsShell(marker)))
    torch.save({"model_config": {"preset": "tiny"}}, folder / "record.pth")
    with pytest.raises(CheckpointFileError, match=r"metadata names posix.system"):
        load_checkpoint(folder)

    # a dotted name under DCP's own module would reach the os module it imports
    def text(s: str) -> bytes:
        return b"\x8c" + bytes([len(s)]) + s.encode()

    dotted = b"\x80\x04" + text("torch.distributed.checkpoint.metadata") + text("os.system") + b"\x93"
    (folder / ".metadata").write_bytes(dotted + text(f"touch {marker}") + b"\x85R.")
    with pytest.raises(CheckpointFileError, match=r"metadata names torch.distributed.checkpoint.metadata.os.system"):
        load_checkpoint(folder)
    assert not marker.exists()


def test_main_sample_refuses_a_crafted_checkpoint_with_one_line(tmp_path):
    path, marker = crafted_checkpoint(tmp_path)
    out = subprocess.run(
        [
            sys.executable,
            "main_sample.py",
            "--checkpoint",
            str(path),
            "--prompt",
            "a red circle",
            "--out_dir",
            str(tmp_path / "samples"),
            "--device",
            "cpu",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 1
    assert "error: refused to load" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists() and not (tmp_path / "samples").exists()


def test_truncated_and_foreign_files_name_the_file_and_what_was_expected(tmp_path):
    model = tiny_model()
    good = save_checkpoint(tmp_path / "good.pth", {"model": model.state_dict(), "model_config": {"preset": "tiny"}})
    data = good.read_bytes()
    cut = tmp_path / "cut.pth"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=r"cut.pth is truncated or corrupt .*JEPA-T checkpoint"):
        load_checkpoint(cut)
    png = tmp_path / "picture.pth"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(
        CheckpointFileError,
        match=r"picture.pth is not a JEPA-T checkpoint: expected a file "
        r"written by torch.save",
    ):
        load_checkpoint(png)
    weights_only = tmp_path / "weights.pth"  # a torch file, but not one of ours
    torch.save({"w": torch.ones(2)}, weights_only)
    with pytest.raises(CheckpointFileError, match="weights.pth is not a JEPA-T checkpoint: expected a dictionary"):
        load_checkpoint(weights_only)
    with pytest.raises(FileNotFoundError, match="no KL-16 VAE"):
        load_torch_file(tmp_path / "missing.ckpt", "KL-16 VAE checkpoint")


def draws() -> tuple:
    return random.random(), float(np.random.rand()), float(np.random.randn()), torch.rand(2).tolist()


def test_rng_state_is_plain_tensors_and_restores_every_generator(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    state = rng_state()
    expected = draws()
    torch.save(state, tmp_path / "rng.pth")
    set_rng_state(torch.load(tmp_path / "rng.pth", weights_only=True))  # no allow-list needed
    assert draws() == expected


def test_format_2_checkpoints_with_numpy_rng_tuples_still_load(tmp_path):
    """Checkpoints written before format 3 kept random.getstate() and np.random.get_state() as
    they are; numpy's array type is the one thing allowed for them."""
    model = tiny_model()
    random.seed(4), np.random.seed(5), torch.manual_seed(6)
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = draws()
    torch.save(
        {
            "format_version": 2,
            "model": model.state_dict(),
            "ema": model.state_dict(),
            "model_config": {"preset": "tiny"},
            "rng": old_rng,
        },
        tmp_path / "old.pth",
    )
    ckpt = load_checkpoint(tmp_path / "old.pth")
    set_rng_state(ckpt["rng"])
    assert draws() == expected
