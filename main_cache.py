"""Cache tokenizer (VAE) moments of a dataset, of every image (and of its horizontal flip for class
folders, or with --random_flip), plus the caption embeddings, so that training reads latents instead of running the VAE and the text encoder.

    python main_cache.py --dataset imagenet --data_path /data/imagenet --cache_dir cache/in256-kl16
    python main_cache.py --dataset webdataset --data_path '/data/cc3m/{00000..00331}.tar' --cache_dir cache/cc3m
    torchrun --nproc_per_node 8 main_cache.py ...           # any number of ranks (NCCL on GPUs, gloo on CPUs)
    bash scripts/cache_vae.sh ...                            # the same through the venv, all visible GPUs

Rerunning the same command after a kill finishes what is missing (nothing twice, nothing left
out); the end prints ``images seen = cached + skipped`` and writes skipped.jsonl with reasons.
The format is described in util/data/latent_cache.py.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Dict

import numpy as np
import torch
from tqdm import tqdm

from models.text_encoders import TEXT_ENCODERS, build_text_encoder
from models.tokenizers import TOKENIZERS, Tokenizer, build_tokenizer
from util.data.caption_table import write_caption_table
from util.data.captions import text_cache_key
from util.data.image_folders import DEFAULT_PROMPT, Listing, TarMembers, build_listing
from util.data.latent_cache import (PENDING, ListingSource, ShapesSource, cache_shard, finalize_cache, num_shards,
                                    prepare_cache, read_meta, shard_rows)
from util.data.tar_shards import list_tar_shards
from util.runtime import init_runtime, interactive, setup_logging, shutdown_runtime

log = logging.getLogger("jepat.cache")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T latent caching", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="imagenet", choices=("imagenet", "captions", "webdataset", "shapes"))
    p.add_argument("--data_path", default="", help="imagenet: the folder with train/<synset>/...; captions: the "
                   "image root (or the manifest itself); webdataset: a brace pattern of tar shards "
                   "(/data/cc3m/{00000..00331}.tar) or a folder of .tar files")
    p.add_argument("--manifest", default=None, help="captions: JSON Lines manifest (paths relative to --data_path)")
    p.add_argument("--prompt_template", default=DEFAULT_PROMPT, help="imagenet: caption of a class")
    p.add_argument("--num_samples", type=int, default=16000, help="shapes: number of images")
    p.add_argument("--seed", type=int, default=0, help="shapes: dataset seed")
    p.add_argument("--img_size", type=int, default=256, help="center-crop size (256 or 512 for ImageNet)")
    p.add_argument("--small_images", default="upscale", choices=("upscale", "skip"),
                   help="images whose short side is below --img_size: upscale (as ADM) or skip")
    p.add_argument("--tokenizer", default="kl16", choices=sorted(TOKENIZERS))
    p.add_argument("--vae_path", default=None, help="kl16: kl16.ckpt; sd-vae: a diffusers folder")
    p.add_argument("--cache_dir", required=True)
    p.add_argument("--shard_size", type=int, default=16384, help="entries per shard file")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16"), help="stored moments")
    p.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=None,
                   help="also store the moments of each image's horizontal flip (default: on for class folders, "
                        "off for captions and shapes); training flips only from a cache that has them")
    p.add_argument("--batch_size", type=int, default=64, help="images per forward pass (x2 with flips)")
    p.add_argument("--num_workers", type=int, default=4)
    p.add_argument("--device", default="auto", help="auto: this rank's GPU, else the CPU")
    p.add_argument("--max_batches", type=int, default=None, help="stop each rank after this many batches "
                   "(a partial run; rerun without it to finish)")
    p.add_argument("--text_encoder", default="minilm", choices=sorted(TEXT_ENCODERS))
    p.add_argument("--text_encoder_path", default=None)
    p.add_argument("--clip_model", default="ViT-L-14")
    p.add_argument("--text_max_length", type=int, default=16, help="must match main_jepat.py's")
    p.add_argument("--text_batch_size", type=int, default=1024, help="captions per text-encoder batch")
    p.add_argument("--no_text_cache", action="store_true", help="do not cache caption embeddings")
    return p


def build_source(args: argparse.Namespace, cache_dir: Path, listed: bool):
    """The images to cache. Ranks other than 0 read the listing rank 0 wrote (``listed``)."""
    if args.dataset == "shapes":
        return ShapesSource(args.num_samples, args.img_size, args.seed)
    if listed:
        d = json.loads((cache_dir / "listing.json").read_text())
        source = d.get("caption_source", {})
        members = TarMembers.from_json(d["members"]) if d.get("members") else None
        listing = Listing(d["root"], d["paths"], d["entry_groups"], d["groups"], d["kind"], d["listing_skipped"],
                          source.get("class_names", []), source.get("template", ""), members)
    elif args.dataset == "webdataset":
        listing = list_tar_shards(args.data_path)
    else:
        listing = build_listing(args.dataset, args.data_path, args.manifest, args.prompt_template)
    return ListingSource(listing, args.img_size, args.small_images)


def tokenizer_meta(tokenizer: Tokenizer, name: str, img_size: int) -> Dict:
    if img_size % tokenizer.stride:
        raise ValueError(f"--img_size {img_size} is not a multiple of the {name} stride {tokenizer.stride}")
    stochastic = hasattr(tokenizer, "moments")
    return {"tokenizer": name, "channels": tokenizer.channels, "stride": tokenizer.stride, "resolution": img_size,
            "scaling": float(getattr(tokenizer, "scaling", 1.0)), "shift": float(getattr(tokenizer, "shift", 0.0)),
            "stochastic": stochastic, "moment_channels": tokenizer.channels * (2 if stochastic else 1)}


def main(args: argparse.Namespace) -> Dict:
    env = init_runtime(args.device, timeout_min=360)
    setup_logging(env)
    try:
        return cache(args, env.rank, env.world_size, env.device, env.barrier)
    finally:
        shutdown_runtime(env)


def cache(args: argparse.Namespace, rank: int, world: int, device: torch.device, barrier) -> Dict:
    """Every rank caches its shards; rank 0 lists the images first and finalises at the end."""
    cache_dir = Path(args.cache_dir)
    tokenizer = build_tokenizer(args.tokenizer, args.vae_path).to(device)
    tmeta = tokenizer_meta(tokenizer, args.tokenizer, args.img_size)
    if rank == 0:
        source = build_source(args, cache_dir, listed=False)
        flipped = args.dataset == "imagenet" if args.random_flip is None else args.random_flip
        meta = prepare_cache(cache_dir, source, tmeta, args.shard_size, args.dtype,
                             vae_source=str(getattr(tokenizer, "source", "")), flipped=flipped)
        log.info("%d entries to cache in %d shards of %d on %d rank(s), %s at %d px -> %s", len(source),
                 num_shards(meta), args.shard_size, world, args.tokenizer, args.img_size, cache_dir)
    barrier()
    if rank != 0:
        source, meta = build_source(args, cache_dir, listed=True), read_meta(cache_dir)

    size = args.img_size // tokenizer.stride
    sample_shape = (tmeta["moment_channels"], size, size)
    encode = tokenizer.moments if tmeta["stochastic"] else tokenizer.encode
    mine = [k for k in range(num_shards(meta)) if k % world == rank]
    todo = sum(_pending(cache_dir, meta, k) for k in mine)
    bar = tqdm(total=todo, desc=f"caching (rank {rank}/{world})", dynamic_ncols=True,
               disable=rank != 0 or not interactive())
    skipped_here, done_here = [0], [0]

    def progress(n: int, bad: int) -> None:
        skipped_here[0] += bad
        done_here[0] += n
        bar.update(n)
        bar.set_postfix(skipped=skipped_here[0])

    finished, batches = True, 0
    with torch.no_grad():
        for k in mine:
            budget = None if args.max_batches is None else args.max_batches - batches
            if budget is not None and budget <= 0:
                finished = False
                break
            ran, done = cache_shard(cache_dir, meta, k, source, encode, args.batch_size, args.num_workers, device,
                                    sample_shape, budget, progress)
            batches += ran
            finished &= done
            if bar.disable and rank == 0:   # a log file gets one line per shard instead of a bar
                log.info("shard %d done: %d of %d images of rank 0, %d skipped", k, done_here[0], todo, skipped_here[0])
    bar.close()
    if not finished:
        log.info("rank %d stopped after %d batches (--max_batches); rerun to finish", rank, batches)
    barrier()
    counts: Dict = {}
    if rank == 0:
        counts = finalize_cache(cache_dir, meta)
        log.info("images seen %d = cached %d + skipped %d (%d converted and cached; %d pending)%s",
                 counts["seen"], counts["cached"], counts["skipped"], counts["converted"], counts["pending"],
                 "" if counts["pending"] else f"; reasons in {cache_dir / 'skipped.jsonl'}")
        if counts["pending"] == 0 and not args.no_text_cache:
            cache_text(args, cache_dir, source.vocabulary, device)
    barrier()
    return counts


def _pending(cache_dir: Path, meta: Dict, k: int) -> int:
    state = cache_dir / "shards" / f"shard-{k:05d}.state.npy"
    if not state.is_file():
        return len(shard_rows(meta, k))
    return int((np.load(state) == PENDING).sum())


def cache_text(args: argparse.Namespace, cache_dir: Path, vocabulary, device: torch.device) -> None:
    """Embed every unique caption once, in batches, into the caption table beside the latents
    (under the text encoder's key); rerun after a kill, it encodes only the rows still missing."""
    key = text_cache_key(args.text_encoder, args.text_max_length, args.clip_model, args.text_encoder_path)
    target = cache_dir / "text" / key
    state = target / "state.npy"
    if state.is_file() and np.load(state, mmap_mode="r").all():
        log.info("caption embeddings already cached in %s", target)
        return
    encoder = build_text_encoder(args.text_encoder, path=args.text_encoder_path, clip_model=args.clip_model,
                                 max_length=args.text_max_length or None, device=str(device))
    bar = tqdm(total=len(vocabulary), desc="captions", dynamic_ncols=True, disable=not interactive())
    done = [0]

    def progress(n: int) -> None:
        bar.update(n)
        done[0] += n
        if bar.disable and (done[0] // 100_000 > (done[0] - n) // 100_000 or done[0] == len(vocabulary)):
            log.info("captions: %d of %d encoded", done[0], len(vocabulary))
    write_caption_table(target, vocabulary, encoder, args.text_batch_size, progress)
    bar.close()
    log.info("cached %d caption embeddings (%s) in %s", len(vocabulary), key, target)


if __name__ == "__main__":
    main(get_args_parser().parse_args())
