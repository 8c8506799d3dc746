"""Shared fixtures: one randomly initialised KL-16 of MAR's
architecture, the same weights written as an LDM-layout kl16.ckpt (as MAR ships it), and a
one-thread torch for tests of tiny matmuls."""

import os

import pytest
import torch

if os.environ.get("PYTEST_XDIST_WORKER"):  # two pytest workers share the machine's two cores
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def kl16_random():
    from models.tokenizers import random_vae

    return random_vae("kl16", seed=3)


@pytest.fixture(scope="session")
def kl16_ckpt(kl16_random, tmp_path_factory):
    from models.vae import diffusers_to_ldm

    path = tmp_path_factory.mktemp("vae") / "kl16.ckpt"
    ldm = diffusers_to_ldm(kl16_random.vae.state_dict(), levels=5)
    torch.save({"model": {**ldm, "loss.logvar": torch.zeros(())}}, path)  # MAR's file also holds its loss
    return path


@pytest.fixture
def one_thread():
    """Tiny matmuls run far faster on one thread on a busy machine (and gloo ranks use one each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shapes_run(tmp_path_factory):
    """One epoch of two steps of the shapes recipe (16 px, 4 tokens, 4 sampling iterations) with its
    sample grid and judged evaluation, logged to TensorBoard and to an offline W&B run under
    ``<run>/wandb_home``: the run folder that the sharing and demo tests read."""
    import os

    import main_jepat
    from tests.test_train import SMALL

    out = tmp_path_factory.mktemp("shapes_run")
    saved = {k: os.environ.get(k) for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_SILENT")}
    os.environ.update(WANDB_MODE="offline", WANDB_DIR=str(out / "wandb_home"), WANDB_SILENT="true")
    (out / "wandb_home").mkdir()
    try:
        args = [a for a in SMALL if a != "--no_eval"] + [
            "--output_dir",
            str(out),
            *(
                "--epochs 1 --num_samples 16 --num_iter 4 --ode_steps 2 --eval_per_combo 1 --grid_freq 1 "
                "--log_with tensorboard,wandb"
            ).split(),
        ]
        main_jepat.main(main_jepat.get_args_parser().parse_args(args))
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return out
