"""Shared fixtures: one randomly initialised KL-16 of MAR's
architecture, the same weights written as an LDM-layout kl16.ckpt (as MAR ships it), and a
one-thread torch for tests of tiny matmuls."""
import pytest
import torch


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
