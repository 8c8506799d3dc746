"""Small builders shared by the tests: a tiny JEPA-T with random (not zero) heads and random
caption embeddings, so that tests exercise every path without loading a text encoder."""

from __future__ import annotations

import os

import torch
import torch.multiprocessing as mp

from models.jepat import JEPAT, build_model
from models.text_encoders import TextEmbeddings

TOKEN_DIM, SEQ_LEN, TEXT_TOK, TEXT_POOL, S = 12, 16, 10, 8, 6

# what a fork server imports once for the ranks the tests start (about 4 s of CPU per process here)
FORK_SERVER_PRELOAD = [
    "main_jepat",
    "main_cache",
    "torch._dynamo",  # the optimizer imports it
    "matplotlib.figure",  # curves.png
    "matplotlib.backends.backend_agg",
]


def fork_server() -> mp.context.BaseContext:
    """The "forkserver" context, preloaded: each process it starts is forked from a server that holds
    no threads and no distributed state and has the training code imported already. Unlike a spawned
    process it inherits the server's environment and stdout/stderr (those of the moment the server
    started in this pytest worker), not the test's: start targets through ``in_environ`` and send
    their output to a file. Targets must be importable functions, as with spawn."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(FORK_SERVER_PRELOAD)
    return ctx


def in_environ(rank: int, environ: dict[str, str], target, *args) -> None:
    """Run ``target(rank, *args)`` with exactly ``environ`` as os.environ (the starting test's,
    passed as ``dict(os.environ)``): what a spawned process would have inherited."""
    os.environ.clear()
    os.environ.update(environ)
    target(rank, *args)


def tiny_model(seed: int = 0, **overrides) -> JEPAT:
    """A very small model; the zero-initialised adaLN / output layers get random values so the
    flow head's output depends on z (as in a trained model)."""
    torch.manual_seed(seed)
    kw = dict(
        token_dim=TOKEN_DIM,
        seq_len=SEQ_LEN,
        text_token_dim=TEXT_TOK,
        text_pooled_dim=TEXT_POOL,
        width=32,
        encoder_depth=1,
        predictor_depth=1,
        num_heads=2,
        flow_width=32,
        flow_depth=2,
        buffer_size=2,
    )
    kw.update(overrides)
    model = build_model("tiny", **kw)
    with torch.no_grad():
        for name, p in model.flow_head.named_parameters():
            if "ada_ln" in name or "final_linear" in name:
                p.normal_(0, 0.2)
    return model.eval()


def random_text(batch: int, seed: int = 0, valid: int = 4) -> TextEmbeddings:
    """Caption embeddings with ``valid`` real tokens per row and padding after them."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(batch, S, dtype=torch.bool)
    mask[:, :valid] = True
    return TextEmbeddings(
        torch.randn(batch, S, TEXT_TOK, generator=g), mask, torch.randn(batch, TEXT_POOL, generator=g)
    )
