"""Cache tokenizer (VAE) moments of a dataset, of every image (and of its horizontal flip for class
folders, or with --random_flip), plus the caption embeddings, so that training reads latents instead of
running the VAE and the text encoder.

    python main_cache.py --config imagenet-base --dataset imagenet --data_path /data/imagenet \
        --cache_dir cache/in256-kl16 --vae_path kl16.ckpt --text_encoder_path clip.bin
    python main_cache.py --config imagenet-base --dataset webdataset --data_path '/data/cc3m/{00000..00331}.tar' \
        --cache_dir cache/cc3m
    torchrun --nproc_per_node 8 main_cache.py ...           # any number of ranks (NCCL on GPUs, gloo on CPUs)
    bash scripts/cache_vae.sh ...                            # the same through the venv, all visible GPUs

Rerunning the same command after a kill finishes what is missing (nothing twice, nothing left
out); the end prints ``images seen = cached + skipped`` and writes skipped.jsonl with reasons.
The format is described in util/data/latent_cache.py. The tokenizer, resolution and text encoder
come from the same configuration as training (``--config``; the cache section says where the
images come from), so that a cache always fits the run that reads it.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.text_encoders import build_text_encoder
from models.tokenizers import Tokenizer, build_tokenizer
from util.config import (
    DEFAULT_RECIPE,
    TrainConfig,
    add_config_args,
    add_setting_flags,
    flag_overrides,
    resolve,
    settings,
)
from util.data.caption_table import write_caption_table
from util.data.captions import text_cache_key
from util.data.datasets import BUILTIN_SETS
from util.data.image_folders import CaptionOrigin, Listing, TarMembers, build_listing
from util.data.latent_cache import (
    PENDING,
    BuiltinSource,
    ListingSource,
    cache_shard,
    finalize_cache,
    num_shards,
    prepare_cache,
    read_meta,
    shard_rows,
)
from util.data.tar_shards import list_tar_shards
from util.errors import UserError
from util.runtime import init_runtime, interactive, setup_logging, shutdown_runtime, user_errors

log = logging.getLogger("jepat.cache")


# the settings main_cache.py reads: the cache section and what makes a cache fit a training run
CACHE_SETTINGS = [
    "model.img_size",
    "model.tokenizer",
    "model.vae_path",
    "data.num_samples",
    "runtime.device",
    "runtime.seed",
]


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        "JEPA-T latent caching",
        description="Pass the training run's --config so that the "
        "tokenizer, resolution and text encoder are the ones it trains with.",
    )
    add_config_args(p)
    add_setting_flags(p, [*settings(["cache"]), *CACHE_SETTINGS, *settings(["captions"])])
    return p


def resolve_args(ns: argparse.Namespace) -> TrainConfig:
    config = resolve(ns.config or [DEFAULT_RECIPE], flag_overrides(ns), ns.overrides)
    if not ns.config and config.cache.dataset != "shapes":
        log.warning(
            "no --config: the cache gets the %s recipe's tokenizer (%s at %d px) and text encoder (%s) unless flags "
            "say otherwise; pass the training run's --config (e.g. imagenet-base) so that the two agree",
            DEFAULT_RECIPE, config.model.tokenizer, config.model.img_size, config.captions.text_encoder,
        )  # fmt: skip
    if not config.cache.cache_dir:
        raise UserError("no cache folder: pass --cache_dir (or set cache.cache_dir in the configuration)")
    if config.cache.dataset not in BUILTIN_SETS and not config.cache.data_path:
        raise UserError(f"--dataset {config.cache.dataset} needs --data_path (the images to cache); the built-in "
                        "sets are --dataset shapes and --dataset pairs")  # fmt: skip
    if config.cache.dataset == "pairs" and config.cache.random_flip:
        raise UserError("the pairs set's captions name left and right, so a flipped image contradicts its caption; "
                        "cache it without --random_flip")  # fmt: skip
    return config


def build_source(c: TrainConfig, cache_dir: Path, listed: bool):
    """The images to cache. Ranks other than 0 read the listing rank 0 wrote (``listed``)."""
    k = c.cache
    if k.dataset in BUILTIN_SETS:
        return BuiltinSource(k.dataset, c.data.num_samples, c.model.img_size, c.runtime.seed)
    if listed:
        d = json.loads((cache_dir / "listing.json").read_text())
        origin = CaptionOrigin.from_dict(d.get("caption_source"))
        members = TarMembers.from_json(d["members"]) if d.get("members") else None
        listing = Listing(
            d["root"],
            d["paths"],
            d["entry_groups"],
            d["groups"],
            d["kind"],
            d["listing_skipped"],
            origin.class_names,
            origin.template,
            members,
        )
    elif k.dataset == "webdataset":
        listing = list_tar_shards(k.data_path)
    else:
        listing = build_listing(k.dataset, k.data_path, k.manifest, k.prompt_template)
    return ListingSource(listing, c.model.img_size, k.small_images)


def tokenizer_meta(tokenizer: Tokenizer, name: str, img_size: int) -> dict:
    if img_size % tokenizer.stride:
        raise ValueError(f"--img_size {img_size} is not a multiple of the {name} stride {tokenizer.stride}")
    stochastic = hasattr(tokenizer, "moments")
    return {
        "tokenizer": name,
        "channels": tokenizer.channels,
        "stride": tokenizer.stride,
        "resolution": img_size,
        "scaling": float(getattr(tokenizer, "scaling", 1.0)),
        "shift": float(getattr(tokenizer, "shift", 0.0)),
        "stochastic": stochastic,
        "moment_channels": tokenizer.channels * (2 if stochastic else 1),
    }


def main(args: argparse.Namespace | TrainConfig) -> dict:
    c = args if isinstance(args, TrainConfig) else resolve_args(args)
    env = init_runtime(c.runtime.device, timeout_min=360)
    setup_logging(env)
    try:
        return cache(c, env.rank, env.world_size, env.device, env.barrier)
    finally:
        shutdown_runtime(env)


def cache(c: TrainConfig, rank: int, world: int, device: torch.device, barrier) -> dict:
    """Every rank caches its shards; rank 0 lists the images first and finalises at the end."""
    k, m = c.cache, c.model
    cache_dir = Path(k.cache_dir)
    tokenizer = build_tokenizer(m.tokenizer, m.vae_path).to(device)
    tmeta = tokenizer_meta(tokenizer, m.tokenizer, m.img_size)
    if rank == 0:
        source = build_source(c, cache_dir, listed=False)
        flipped = k.dataset == "imagenet" if k.random_flip is None else k.random_flip
        vae = str(getattr(tokenizer, "source", ""))
        meta = prepare_cache(cache_dir, source, tmeta, k.shard_size, k.dtype, vae_source=vae, flipped=flipped)
        log.info(
            "%d entries to cache in %d shards of %d on %d rank(s), %s at %d px -> %s",
            len(source), num_shards(meta), k.shard_size, world, m.tokenizer, m.img_size, cache_dir,
        )  # fmt: skip
    barrier()
    if rank != 0:
        source, meta = build_source(c, cache_dir, listed=True), read_meta(cache_dir)

    size = m.img_size // tokenizer.stride
    sample_shape = (tmeta["moment_channels"], size, size)
    encode = tokenizer.moments if tmeta["stochastic"] else tokenizer.encode
    mine = [s for s in range(num_shards(meta)) if s % world == rank]
    todo = sum(_pending(cache_dir, meta, s) for s in mine)
    quiet = rank != 0 or not interactive()
    bar = tqdm(total=todo, desc=f"caching (rank {rank}/{world})", dynamic_ncols=True, disable=quiet)
    skipped_here, done_here = [0], [0]

    def progress(n: int, bad: int) -> None:
        skipped_here[0] += bad
        done_here[0] += n
        bar.update(n)
        bar.set_postfix(skipped=skipped_here[0])

    finished, batches = True, 0
    with torch.no_grad():
        for shard in mine:
            budget = None if k.max_batches is None else k.max_batches - batches
            if budget is not None and budget <= 0:
                finished = False
                break
            work = (k.batch_size, k.num_workers, device, sample_shape, budget, progress)
            ran, done = cache_shard(cache_dir, meta, shard, source, encode, *work)
            batches += ran
            finished &= done
            if bar.disable and rank == 0:  # a log file gets one line per shard instead of a bar
                log.info(
                    "shard %d done: %d of %d images of rank 0, %d skipped", shard, done_here[0], todo, skipped_here[0]
                )
    bar.close()
    if not finished:
        log.info("rank %d stopped after %d batches (--max_batches); rerun to finish", rank, batches)
    barrier()
    counts: dict = {}
    if rank == 0:
        counts = finalize_cache(cache_dir, meta)
        n = counts
        reasons = "" if n["pending"] else f"; reasons in {cache_dir / 'skipped.jsonl'}"
        log.info(
            "images seen %d = cached %d + skipped %d (%d converted and cached; %d pending)%s",
            n["seen"], n["cached"], n["skipped"], n["converted"], n["pending"], reasons,
        )  # fmt: skip
        if counts["pending"] == 0 and not k.skip_text:
            cache_text(c, cache_dir, source.vocabulary, device)
    barrier()
    return counts


def _pending(cache_dir: Path, meta: dict, k: int) -> int:
    state = cache_dir / "shards" / f"shard-{k:05d}.state.npy"
    if not state.is_file():
        return len(shard_rows(meta, k))
    return int((np.load(state) == PENDING).sum())


def cache_text(c: TrainConfig, cache_dir: Path, vocabulary, device: torch.device) -> None:
    """Embed every unique caption once, in batches, into the caption table beside the latents
    (under the text encoder's key); rerun after a kill, it encodes only the rows still missing."""
    t = c.captions
    key = text_cache_key(t.text_encoder, t.text_max_length, t.clip_model, t.text_encoder_path)
    target = cache_dir / "text" / key
    state = target / "state.npy"
    if state.is_file() and np.load(state, mmap_mode="r").all():
        log.info("caption embeddings already cached in %s", target)
        return
    encoder = build_text_encoder(
        t.text_encoder,
        path=t.text_encoder_path,
        clip_model=t.clip_model,
        max_length=t.text_max_length or None,
        device=str(device),
    )
    bar = tqdm(total=len(vocabulary), desc="captions", dynamic_ncols=True, disable=not interactive())
    done = [0]

    def progress(n: int) -> None:
        bar.update(n)
        done[0] += n
        if bar.disable and (done[0] // 100_000 > (done[0] - n) // 100_000 or done[0] == len(vocabulary)):
            log.info("captions: %d of %d encoded", done[0], len(vocabulary))

    write_caption_table(target, vocabulary, encoder, c.cache.text_batch_size, progress)
    bar.close()
    log.info("cached %d caption embeddings (%s) in %s", len(vocabulary), key, target)


if __name__ == "__main__":
    with user_errors():
        main(get_args_parser().parse_args())
