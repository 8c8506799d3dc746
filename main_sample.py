"""Generate images from text with a trained JEPA-T checkpoint or model folder (its EMA weights),
or export a checkpoint as a Hugging Face-style model folder.

    python main_sample.py --checkpoint output/shapes/checkpoint-last.pth \
        --prompt "a red circle" --prompt "a square that is green" --out_dir samples/
    python main_sample.py --checkpoint CKPT --prompts_file prompts.txt --guidance_scale 4 --ode_solver heun
    python main_sample.py --checkpoint CKPT --export_dir exported/shapes   # model.safetensors, config.json, README.md
    python main_sample.py --checkpoint exported/shapes --prompt "a red circle"

The checkpoint (or folder) rebuilds its own model, text encoder and tokenizer, and its sampling
settings are the defaults of every sampling flag. Writes one PNG per image, ``grid.png`` (one row
per prompt) and ``manifest.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import asdict
from pathlib import Path

from torchvision.utils import save_image

from util.config import add_setting_flags, flag_overrides, settings
from util.errors import UserError
from util.evaluation.generate import save_images
from util.pretrained import build_generator, export_pretrained, load_pretrained
from util.runtime import PRECISIONS, init_runtime, resolve_precision, setup_logging, shutdown_runtime, user_errors

log = logging.getLogger("jepat.sample")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T sampling", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument(
        "--checkpoint",
        required=True,
        help="checkpoint-*.pth written by main_jepat.py, or a model folder written by --export_dir",
    )
    p.add_argument(
        "--export_dir",
        default=None,
        help="write the checkpoint's EMA as model.safetensors + config.json + README.md model card here "
        "(then sample too if prompts are given)",
    )
    p.add_argument("--prompt", action="append", default=[], help="a caption; repeat for several")
    p.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    p.add_argument("--num_per_prompt", type=int, default=4)
    p.add_argument("--out_dir", default="samples")
    add_setting_flags(
        p,
        [path for path in settings(["sampling"])],
        default_suppressed=False,
        title="sampling (default: the checkpoint's own settings)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--text_encoder_path", default=None, help="override the text encoder weights used in training")
    p.add_argument("--vae_path", default=None, help="VAE weights (default: the training run's --vae_path)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA (checkpoints only)")
    return p


def read_prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise UserError(f"no prompts file at {path}")
        prompts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts and not args.export_dir:
        raise UserError("give at least one --prompt or a --prompts_file")
    return prompts


def main(args: argparse.Namespace) -> list[dict]:
    setup_logging()
    prompts = read_prompts(args)
    pretrained = load_pretrained(args.checkpoint, raw=args.raw)
    if args.export_dir:
        export_pretrained(pretrained, args.export_dir)
        if not prompts:
            return []
    env = init_runtime(args.device)
    try:
        overrides = {path.split(".", 1)[1]: v for path, v in flag_overrides(args).items()}
        text_path = {"text_encoder_path": args.text_encoder_path} if args.text_encoder_path else {}
        gen = build_generator(
            pretrained, env.device, resolve_precision(env.device, args.precision), overrides, text_path, args.vae_path
        )  # free prompts: the text encoder, not a cache
        sampling = gen.sampling
        expanded = [p for p in prompts for _ in range(args.num_per_prompt)]
        images = gen.generate(expanded, args.seed, args.batch_size)
    finally:
        shutdown_runtime(env)
    out = Path(args.out_dir)
    names = save_images(images, out)
    rows = [
        {"file": name, "prompt": p, "seed": args.seed, "index": i} for i, (name, p) in enumerate(zip(names, expanded))
    ]
    save_image((images + 1) / 2, out / "grid.png", nrow=args.num_per_prompt, padding=1, pad_value=0.5)
    with open(out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "sampling": asdict(sampling)}) + "\n")
    log.info("wrote %d images, grid.png and manifest.jsonl to %s", len(rows), out)
    return rows


if __name__ == "__main__":
    with user_errors():
        main(get_args_parser().parse_args())
