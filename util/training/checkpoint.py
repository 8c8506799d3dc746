"""Checkpoints: one save/load pair written atomically (temp file in the same folder + rename), and
one object, ``TrainingCheckpoint``, that owns what a training checkpoint holds and how it is restored.

A checkpoint holds the trainable model only (never the frozen text encoder or tokenizer), its EMA,
the model config (so a checkpoint rebuilds its own model), the run's resolved configuration tree
(``config``, util/config.py, as plain data: its sampling section is the sampler's defaults), what
the run measured of its captions (``captions_info``: encoder widths, how the captions were made) and,
for training, the optimizer, scaler, step counters, generator and RNG states.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.jepat import JEPAT, config_dict
from models.safe_load import CheckpointFileError, load_torch_file, numpy_array_globals
from util.errors import UserError
from util.training.parallel import Parallel
from util.training.sharded import is_sharded, link_copy, load_into, read_record, read_sharded, save_sharded

log = logging.getLogger(__name__)

FORMAT_VERSION = 4  # 4: the configuration tree (3: RNG states as tensors and numbers)


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the ``_orig_mod.`` (torch.compile) and ``module.`` (DDP) prefixes."""
    out = {}
    for k, v in state.items():
        for prefix in ("_orig_mod.", "module."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k.replace("._orig_mod.", ".")] = v
    return out


def rng_state() -> dict[str, Any]:
    """Python's, numpy's, torch's (and CUDA's) global RNG states as tensors and plain numbers, so a
    checkpoint loads with ``weights_only=True``."""
    version, mt, gauss_next = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():  # this process's device only: a resume may see another number of GPUs
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`rng_state`; also reads the tuples of format 2 checkpoints."""
    py, npy = state["python"], state["numpy"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
    if isinstance(npy, dict):
        npy = (npy["name"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        # format 3 kept one state per visible GPU (a list); the device of this process takes the first
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda)


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: readers see the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format_version": FORMAT_VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_preset(state: dict, expected: str, path: str | os.PathLike) -> None:
    """A clear error for a checkpoint (or sharded record) of another preset than ``expected``."""
    preset = state["model_config"].get("preset", "")
    if preset != expected:
        raise ValueError(
            f"checkpoint {path} holds a '{preset}' model but '{expected}' was asked for; "
            f"pass --model {preset} or another checkpoint"
        )


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu", expect_preset: str | None = None
) -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``: tensors and plain data only, nothing in the file
    can run code (format 2 files also need numpy's array type for their RNG state, allowed here).
    ``expect_preset`` raises a clear error for a checkpoint of another preset."""
    path = Path(path)
    if is_sharded(path):  # a checkpoint-*.dcp folder written under FSDP: assembled here
        state = read_sharded(path)
    elif not path.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {path}; pass a checkpoint-*.pth file (or .dcp folder) written by main_jepat.py"
        )
    else:
        state = load_torch_file(path, "JEPA-T checkpoint", map_location, allowed=numpy_array_globals())
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointFileError(
            f"{path} is not a JEPA-T checkpoint: expected a dictionary with 'model' and "
            "'model_config' entries, as main_jepat.py writes"
        )
    if expect_preset is not None:
        check_preset(state, expect_preset, path)
    for key in ("model", "ema"):
        if key in state:
            state[key] = clean_state_dict(state[key])
    return state


SAMPLING_RENAMED = {"cfg": "guidance_scale", "cfg_schedule": "guidance_schedule", "sampler": "ode_solver"}


def upgrade_sampling(sampling: dict[str, Any]) -> dict[str, Any]:
    """Sampling settings under their current names (format 1-3 files say cfg, cfg_schedule, sampler)."""
    return {SAMPLING_RENAMED.get(k, k): v for k, v in sampling.items()}


def recipe_of_config(config: dict[str, Any], captions_info: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``sampling``, ``captions`` and ``image`` views of a stored configuration tree (plus what
    the run measured of its captions: encoder widths, length and how the captions were made)."""
    model, data = config["model"], config["data"]
    data_path = (
        (data["data_path"] or config.get("cache", {}).get("cache_dir", ""))
        if data["dataset"] == "cached"
        else data["data_path"]
    )
    return {
        "sampling": dict(config["sampling"]),
        "captions": {"dataset": data["dataset"], "data_path": data_path, **config["captions"], **captions_info},
        "image": {k: model[k] for k in ("tokenizer", "vae_path", "patch_size", "img_size")},
    }


def checkpoint_recipe(ckpt: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The checkpoint's own recipe: ``sampling``, ``captions`` and ``image`` dictionaries, from its
    configuration tree (format 4). Reads formats 1 to 3 too: 2 and 3 kept the three dictionaries,
    1 kept them among the launch arguments; their sampling keys are renamed to today's."""
    if "config" in ckpt:
        return recipe_of_config(ckpt["config"], ckpt.get("captions_info", {}))
    if "sampling" in ckpt:
        recipe = {k: dict(ckpt[k]) for k in ("sampling", "captions", "image")}
        recipe["sampling"] = upgrade_sampling(recipe["sampling"])
        return recipe
    args, te = ckpt.get("args", {}), ckpt.get("text_encoder", {})
    sampling = upgrade_sampling(
        {k: args[k] for k in ("num_iter", "cfg", "cfg_schedule", "temperature", "ode_steps", "sampler") if k in args}
    )
    captions = {
        "dataset": args.get("dataset"),
        "data_path": args.get("data_path"),
        "text_encoder": te.get("name", args.get("text_encoder")),
        "clip_model": args.get("clip_model"),
        "text_encoder_path": args.get("text_encoder_path"),
        "text_max_length": args.get("text_max_length"),
        "token_dim": te.get("token_dim"),
        "pooled_dim": te.get("pooled_dim"),
    }
    image = {
        "tokenizer": ckpt.get("tokenizer"),
        "vae_path": args.get("vae_path"),
        "patch_size": ckpt.get("patch_size"),
        "img_size": ckpt.get("img_size"),
    }
    return {"sampling": sampling, "captions": captions, "image": image}


def training_summary(ckpt: dict[str, Any]) -> dict[str, Any]:
    """Recipe, data, epochs, batch, lr and seed of the run that wrote ``ckpt`` (for model cards)."""
    if "config" in ckpt:
        c = ckpt["config"]
        summary = {
            "recipe": c.get("recipe"),
            "dataset": c["data"]["dataset"],
            "epochs": c["optim"]["epochs"],
            "batch_size": c["optim"]["batch_size"],
            "accum_iter": c["optim"]["accum_iter"],
            "lr": c["optim"]["lr"],
            "blr": c["optim"]["blr"],
            "seed": c["runtime"]["seed"],
        }
    else:
        args = ckpt.get("args", {})
        summary = {
            k: args[k]
            for k in ("recipe", "dataset", "epochs", "batch_size", "accum_iter", "lr", "blr", "seed")
            if k in args
        }
    summary["train_seconds"] = ckpt.get("state", {}).get("train_seconds")
    return summary


def trained_shape(state: dict, world: int, batch: int, accum: int) -> tuple[int, int, int]:
    """The (processes, batch, accumulation) a checkpoint's ``state`` was trained with (this run's
    where an older file does not say)."""
    return state.get("world_size", world), state.get("batch_size", batch), state.get("accum_iter", accum)


def check_global_batch(state: dict, world: int, batch: int, accum: int) -> None:
    """Refuse a checkpoint whose global batch (images per optimizer step) differs from this run's."""
    saved = trained_shape(state, world, batch, accum)
    if saved[0] * saved[1] * saved[2] != world * batch * accum:
        raise UserError(
            f"the checkpoint was trained with a global batch of {saved[0]} x {saved[1]} x {saved[2]} = "
            f"{saved[0] * saved[1] * saved[2]} images per step, this run has {world} x {batch} x {accum}: "
            "keep the global batch (set --accum_iter or --batch_size) so that steps, lr and schedules agree"
        )


def check_compatible(ckpt: dict, model: JEPAT, path: str) -> None:
    """A checkpoint must match the model built from the arguments (preset, tokens, text dims)."""
    saved, now = ckpt["model_config"], config_dict(model)
    if saved.get("preset") != now["preset"]:
        raise ValueError(
            f"checkpoint {path} holds a '{saved.get('preset')}' model but --model is "
            f"'{now['preset']}'; pass --model {saved.get('preset')}"
        )
    diff = {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}
    if diff:
        raise ValueError(
            f"checkpoint {path} does not match the arguments: "
            + ", ".join(f"{k}: checkpoint {a} vs now {b}" for k, (a, b) in diff.items())
        )


@dataclass
class TrainState:
    """Counters that make a resume exact; saved in the checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    host_generator: torch.Generator = field(default_factory=torch.Generator)
    prior_seconds: float = 0.0  # training time of the runs this one resumes
    started: float = field(default_factory=time.time)

    def train_seconds(self) -> float:
        return self.prior_seconds + time.time() - self.started


@dataclass
class CheckpointPolicy:
    """Which checkpoints a run keeps: ``checkpoint-last.pth`` always; ``checkpoint-<epoch>.pth``
    every ``save_freq`` epochs, of which the ``keep_last`` newest stay (0: all) and those at
    multiples of ``milestone_every`` epochs are never removed (0: none)."""

    save_freq: int = 0
    keep_last: int = 0
    milestone_every: int = 0

    def saves(self, epoch: int) -> bool:
        return self.save_freq > 0 and epoch % self.save_freq == 0

    def milestone(self, epoch: int) -> bool:
        return self.milestone_every > 0 and epoch % self.milestone_every == 0

    def removable(self, epochs: list[int]) -> list[int]:
        """Of the epoch checkpoints on disk, those the policy no longer keeps."""
        ordinary = sorted(e for e in epochs if not self.milestone(e))
        return ordinary[: -self.keep_last] if self.keep_last else []

    def peak_files(self, epochs: int) -> dict[str, int]:
        """The most full checkpoints on disk at once over ``epochs`` epochs, by kind."""
        saved = [e for e in range(1, epochs + 1) if self.saves(e)]
        milestones = sum(self.milestone(e) for e in saved)
        ordinary = len(saved) - milestones
        recent = min(self.keep_last, ordinary) if self.keep_last else ordinary
        return {"last": 1, "recent": recent, "milestones": milestones, "being written": 1}


class TrainingCheckpoint:
    """What a training checkpoint holds, saved from and restored into one run.

    ``record`` holds what describes the run and never changes during it: the model config, the
    configuration tree and the captions' info.
    """

    def __init__(
        self,
        out_dir: Path,
        parallel: Parallel,
        optimizer: torch.optim.Optimizer,
        state: TrainState,
        record: dict[str, Any],
        policy: CheckpointPolicy | None = None,
        batch_size: int = 1,
        accum_iter: int = 1,
        sharded: bool = False,
    ) -> None:
        self.out_dir, self.parallel, self.optimizer, self.state, self.record = (
            out_dir,
            parallel,
            optimizer,
            state,
            record,
        )
        self.policy = policy or CheckpointPolicy()
        self.batch_size = batch_size  # per process: with the world size, where in the epoch a batch count is
        self.accum_iter = accum_iter
        self.sharded = sharded  # FSDP: checkpoint-<tag>.dcp folders written by every rank (util/training/sharded.py)
        self.suffix = ".dcp" if sharded else ".pth"

    def path(self, tag: str | int) -> Path:
        return self.out_dir / f"checkpoint-{tag}{self.suffix}"

    def save_epoch(self, epoch: int) -> None:
        """At the end of ``epoch``: ``checkpoint-last.pth``, and ``checkpoint-<epoch>.pth`` when the
        policy keeps this epoch. Both names are one file (a hard link; a copy where the file system
        has none): the state is serialised once. Then the epoch files the policy drops are removed."""
        if not self.policy.saves(epoch):
            self.save("last")
            return
        path = self.save(str(epoch))
        if path is None:  # not rank 0
            return
        last = self.path("last")
        if self.sharded:
            link_copy(path, last)
        else:
            tmp = self.out_dir / ".checkpoint-last.pth.link"
            tmp.unlink(missing_ok=True)
            try:
                os.link(path, tmp)
            except OSError:
                shutil.copyfile(path, tmp)
            os.replace(tmp, last)
        stems = [p.name.removesuffix(self.suffix) for p in self.out_dir.glob(f"checkpoint-*{self.suffix}")]
        on_disk = [int(t.split("-")[1]) for t in stems if t.split("-")[1].isdigit()]
        # files of later epochs (a run restarted from an earlier checkpoint) are left alone
        for e in self.policy.removable([e for e in on_disk if e <= epoch]):
            old = self.path(e)
            shutil.rmtree(old, ignore_errors=True) if self.sharded else old.unlink(missing_ok=True)
            log.info(
                "removed %s (the policy keeps the %d newest and every %d-th epoch)",
                old.name,
                self.policy.keep_last,
                self.policy.milestone_every,
            )

    @staticmethod
    def read(path: str, preset: str, world: int, batch: int, accum: int, sharded_later: bool = False) -> dict:
        """Read the checkpoint to resume and refuse one of another preset or another global batch,
        before the model is built (building a large preset takes a while; the answer is known now).
        ``sharded_later`` (an FSDP run): of a sharded checkpoint only the record is read here; the
        ranks read their own shards in :meth:`restore`."""
        if sharded_later and is_sharded(path):
            ckpt = {**read_record(Path(path)), "sharded_path": str(path)}
            check_preset(ckpt, preset, path)
        else:
            ckpt = load_checkpoint(path, expect_preset=preset)
        if "state" not in ckpt:
            raise CheckpointFileError(
                f"{path} holds weights but no training state, so training cannot resume from it; "
                "sample from it with main_sample.py or evaluate it with --evaluate"
            )
        check_global_batch(ckpt["state"], world, batch, accum)
        return ckpt

    @staticmethod
    def load_weights(ckpt: dict[str, Any], path: str, model: JEPAT, ema: JEPAT) -> None:
        """Check the checkpoint read by :meth:`read` against the built ``model`` and load the model and
        EMA weights (before any wrapping shards them; a sharded checkpoint's wait for :meth:`restore`)."""
        check_compatible(ckpt, model, path)
        if "sharded_path" not in ckpt:
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])

    def restore(self, ckpt: dict[str, Any]) -> None:
        """Optimizer, scaler, counters, generators: what makes the resumed run continue exactly."""
        if "sharded_path" in ckpt:
            load_into(Path(ckpt["sharded_path"]), self.parallel, self.optimizer)
        else:
            self.parallel.load_optimizer_state(self.optimizer, ckpt["optimizer"])
        if self.parallel.scaler is not None and ckpt.get("scaler"):
            self.parallel.scaler.load_state_dict(ckpt["scaler"])
        s, st = ckpt["state"], self.state
        st.step, st.epoch, st.batch_in_epoch = s["step"], s["epoch"], s["batch_in_epoch"]
        world, batch, accum = self.parallel.env.world_size, self.batch_size, self.accum_iter
        saved = trained_shape(s, world, batch, accum)  # its global batch was checked by read()
        if saved != (world, batch, accum):  # another node shape: continue from the same sample of the epoch
            samples = s["batch_in_epoch"] * saved[0] * saved[1]  # whole steps: a multiple of this run's batches
            st.batch_in_epoch = samples // (world * batch)
            log.info(
                "the checkpoint was written by %d process(es) x batch %d x accum %d, this run is %d x %d x %d: "
                "continuing at sample %d of epoch %d", *saved, world, batch, accum, samples, st.epoch,
            )  # fmt: skip
        st.host_generator.set_state(s["host_generator"])
        st.prior_seconds = s.get("train_seconds", 0.0)
        set_rng_state(ckpt["rng"])

    def save(self, tag: str) -> Path | None:
        """``checkpoint-<tag>.pth`` in the run folder; a collective (every rank calls it). Returns
        the path on rank 0, None elsewhere."""
        p = self.parallel
        if not p.all_finite():
            raise FloatingPointError(
                f"non-finite weights at step {self.state.step}; not overwriting the last good "
                f"checkpoint in {self.out_dir}. Lower --lr or use --precision fp32 to investigate"
            )
        p.check_replicas()
        if self.sharded:
            return self._save_sharded(tag)
        # full state dicts on rank 0 (FSDP gathers shards: every rank takes part); plain for any strategy
        t0 = time.perf_counter()
        model_sd, ema_sd, optim_sd = p.model_state(), p.ema_state(), p.optimizer_state(self.optimizer)
        if not p.env.is_main:
            return None
        t1 = time.perf_counter()
        path = save_checkpoint(
            self.path(tag), {**self._record(), "model": model_sd, "ema": ema_sd, "optimizer": optim_sd}
        )
        log.info(
            "%s: %.2f GB, state gathered in %.1f s, written in %.1f s",
            path.name, path.stat().st_size / 1e9, t1 - t0, time.perf_counter() - t1,
        )  # fmt: skip
        return path

    def _save_sharded(self, tag: str) -> Path | None:
        path = self.path(tag)
        seconds = save_sharded(
            path, self.parallel, self.optimizer, {"format_version": FORMAT_VERSION, **self._record()}
        )
        if not self.parallel.env.is_main:
            return None
        size = sum(f.stat().st_size for f in path.iterdir())
        log.info("%s: %.2f GB in shards written by every rank in %.1f s", path.name, size / 1e9, seconds)
        return path

    def _record(self) -> dict[str, Any]:
        """Everything but the weights and moments: what the run is, and where it stands."""
        p, st = self.parallel, self.state
        return {
            **self.record,
            "scaler": p.scaler.state_dict() if p.scaler else None,
            "state": {
                "step": st.step,
                "epoch": st.epoch,
                "batch_in_epoch": st.batch_in_epoch,  # of this run's world_size x batch_size
                "world_size": p.env.world_size,
                "batch_size": self.batch_size,
                "accum_iter": self.accum_iter,
                "host_generator": st.host_generator.get_state(),
                "train_seconds": st.train_seconds(),
            },
            "rng": rng_state(),
        }


def convert_sharded(folder: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the plain single-file checkpoint (what every tool reads) of a sharded ``.dcp`` folder."""
    if not is_sharded(folder):
        raise UserError(f"{folder} is not a sharded checkpoint (a checkpoint-*.dcp folder with DCP's .metadata)")
    state = read_sharded(folder)
    state.pop("format_version", None)
    return save_checkpoint(out, state)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description="Checkpoint tools. --convert: a sharded FSDP folder -> one plain file.")
    p.add_argument(
        "--convert", nargs=2, metavar=("FOLDER", "OUT"), required=True, help="checkpoint-<tag>.dcp, out .pth"
    )
    a = p.parse_args()
    print(f"wrote {convert_sharded(*a.convert)}")


if __name__ == "__main__":
    main()
