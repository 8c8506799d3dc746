"""Generate images from text with a trained JEPA-T checkpoint (its EMA weights).

    python main_sample.py --checkpoint output/tiny_shapes/checkpoint-last.pth \
        --prompt "a red circle" --prompt "a square that is green" --out_dir samples/
    python main_sample.py --checkpoint CKPT --prompts_file prompts.txt --cfg 4 --sampler euler

Writes one PNG per image, ``grid.png`` (one row per prompt) and ``manifest.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import List

import torch
from torchvision.utils import save_image

from engine_jepat import generate_images
from main_jepat import resolve_device, resolve_precision
from models.flow_head import SAMPLERS
from models.jepat import JEPAT, JEPATConfig
from models.sampler import CFG_SCHEDULES, SamplingConfig
from models.text_encoders import build_text_encoder
from models.tokenizers import build_tokenizer
from util.checkpoint import load_checkpoint
from util.text_cache import TextEmbeddingTable

log = logging.getLogger("jepat.sample")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T sampling", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint written by main_jepat.py")
    p.add_argument("--prompt", action="append", default=[], help="a caption; repeat for several")
    p.add_argument("--prompts_file", default=None, help="text file, one prompt per line")
    p.add_argument("--num_per_prompt", type=int, default=4)
    p.add_argument("--out_dir", default="samples")
    p.add_argument("--num_iter", type=int, default=None, help="unmasking steps (default: the training run's)")
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default: the training run's)")
    p.add_argument("--cfg_schedule", default=None, choices=CFG_SCHEDULES)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--ode_steps", type=int, default=None)
    p.add_argument("--sampler", default=None, choices=SAMPLERS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=64)
    p.add_argument("--text_encoder_path", default=None, help="override the CLIP weights used in training")
    p.add_argument("--vae_path", default=None, help="VAE weights (default: the training run's --vae_path)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    return p


def read_prompts(args: argparse.Namespace) -> List[str]:
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise SystemExit(f"no prompts file at {path}")
        prompts += [line.rstrip("\n") for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise SystemExit("give at least one --prompt or a --prompts_file")
    return prompts


def main(args: argparse.Namespace) -> List[dict]:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    prompts = read_prompts(args)
    device = resolve_device(args.device)
    precision = resolve_precision(device, args.precision)
    ckpt = load_checkpoint(args.checkpoint)
    targs = ckpt["args"]
    model = JEPAT(JEPATConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["model" if args.raw else "ema"])
    te = ckpt["text_encoder"]
    encoder = build_text_encoder(te["name"], path=args.text_encoder_path or targs.get("text_encoder_path"),
                                 clip_model=targs.get("clip_model", "ViT-L-14"), max_length=te["max_length"],
                                 device=str(device))
    if (encoder.token_dim, encoder.pooled_dim) != (te["token_dim"], te["pooled_dim"]):
        raise SystemExit(f"text encoder {te['name']} gives widths {(encoder.token_dim, encoder.pooled_dim)} but the "
                         f"checkpoint was trained with {(te['token_dim'], te['pooled_dim'])}; pass the same encoder")
    tokenizer = build_tokenizer(ckpt["tokenizer"], args.vae_path or ckpt.get("args", {}).get("vae_path")).to(device)
    sampling = SamplingConfig(**{k: getattr(args, k) if getattr(args, k) is not None else targs[k]
                                 for k in ("num_iter", "cfg", "cfg_schedule", "temperature", "ode_steps", "sampler")})
    table = TextEmbeddingTable(encoder, device)
    expanded = [p for p in prompts for _ in range(args.num_per_prompt)]
    images = generate_images(model, table, tokenizer, expanded, sampling, ckpt["patch_size"], args.seed, device,
                             precision, args.batch_size)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (p, img) in enumerate(zip(expanded, images)):
        name = f"{i:05d}.png"
        save_image((img + 1) / 2, out / name)
        rows.append({"file": name, "prompt": p, "seed": args.seed, "index": i})
    save_image((images + 1) / 2, out / "grid.png", nrow=args.num_per_prompt, padding=1, pad_value=0.5)
    with open(out / "manifest.jsonl", "w") as f:
        for r in rows:
            f.write(json.dumps({**r, "sampling": vars(sampling)}) + "\n")
    log.info("wrote %d images, grid.png and manifest.jsonl to %s", len(rows), out)
    return rows


if __name__ == "__main__":
    main(get_args_parser().parse_args())
