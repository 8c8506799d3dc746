"""Speed / quality table of the sampler for one checkpoint on ``shapes``: seconds per image and
judged accuracy (seen and held-out prompts) over num_iter x ODE steps x ODE sampler x CFG on/off.

    python benchmarks/bench_sample.py output/shapes/checkpoint-last.pth
    python benchmarks/bench_sample.py CKPT --num_iter 4,8,16 --ode_steps 5,10,20 --samplers euler,heun \
        --cfg 3 --per_combo 8

CFG off means guidance 1.0, which also skips the null-condition half of the batch. Timings are
wall-clock seconds per image for the whole judged set (generation only), measured in one run.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from util.runtime import init_runtime, resolve_precision  # noqa: E402
from models.jepat import JEPAT, JEPATConfig  # noqa: E402
from models.sampler import SamplingConfig  # noqa: E402
from models.tokenizers import build_tokenizer  # noqa: E402
from util.data import shapes  # noqa: E402
from util.evaluation import judge  # noqa: E402
from util.evaluation.generate import ImageGenerator  # noqa: E402
from util.training.checkpoint import checkpoint_recipe, load_checkpoint  # noqa: E402
from util.evaluation.shapes_eval import shapes_prompts  # noqa: E402
from util.data.captions import build_caption_store  # noqa: E402


def ints(s: str):
    return [int(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--num_iter", default="4,16", help="comma-separated unmasking steps")
    p.add_argument("--ode_steps", default="5,20", help="comma-separated flow ODE steps")
    p.add_argument("--samplers", default="euler,heun")
    p.add_argument("--cfg", type=float, default=3.0, help="the guidance scale of 'CFG on' (off: 1.0)")
    p.add_argument("--temperature", type=float, default=None, help="default: the training run's")
    p.add_argument("--per_combo", type=int, default=8, help="images per color-shape combination")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = init_runtime(a.device).device
    precision = resolve_precision(device, a.precision)
    ckpt = load_checkpoint(a.checkpoint)
    recipe = checkpoint_recipe(ckpt)
    model = JEPAT(JEPATConfig(**ckpt["model_config"])).to(device)
    model.load_state_dict(ckpt["ema"])
    table = build_caption_store(recipe["captions"], device, use_cache=False)
    tokenizer = build_tokenizer(recipe["image"]["tokenizer"], recipe["image"]["vae_path"]).to(device)
    splits = {"seen": shapes_prompts(shapes.SEEN_COMBOS, a.per_combo),
              "heldout": shapes_prompts(shapes.HELDOUT_COMBOS, a.per_combo)}
    table.add([p for prompts, _ in splits.values() for p in prompts])
    temperature = a.temperature if a.temperature is not None else recipe["sampling"]["temperature"]
    print(f"checkpoint {a.checkpoint} (step {ckpt['state']['step']}), device {device}, precision {precision}, "
          f"temperature {temperature}, {a.per_combo} images per combination "
          f"({len(splits['seen'][0])} seen + {len(splits['heldout'][0])} held-out), {torch.get_num_threads()} threads")
    # one untimed warm-up so the first row does not pay for lazy initialisation
    warm = SamplingConfig(num_iter=2, ode_steps=1)
    ImageGenerator(model, table, tokenizer, warm, device, precision).generate(splits["seen"][0][:2], a.seed)
    header = (f"{'num_iter':>8} {'ode':>4} {'sampler':>7} {'cfg':>5} {'s/image':>8} {'seen joint':>10} "
              f"{'held joint':>10} {'seen color':>10} {'seen shape':>10}")
    print(header)
    rows = []
    for num_iter, ode, sampler, cfg in itertools.product(ints(a.num_iter), ints(a.ode_steps), a.samplers.split(","),
                                                         (1.0, a.cfg)):
        sampling = SamplingConfig(num_iter=num_iter, cfg=cfg, cfg_schedule=recipe["sampling"].get("cfg_schedule", "linear"),
                                  temperature=temperature, ode_steps=ode, sampler=sampler)
        row = {"num_iter": num_iter, "ode_steps": ode, "sampler": sampler, "cfg": cfg}
        seconds, count = 0.0, 0
        for split, (prompts, targets) in splits.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = ImageGenerator(model, table, tokenizer, sampling, device, precision).generate(prompts, a.seed)
            seconds += time.perf_counter() - t0
            count += len(prompts)
            row[split] = judge.score(judge.judge_batch(images), targets)
        row["seconds_per_image"] = seconds / count
        rows.append(row)
        print(f"{num_iter:8d} {ode:4d} {sampler:>7} {cfg:5.1f} {row['seconds_per_image']:8.4f} "
              f"{row['seen']['joint_acc']:10.3f} {row['heldout']['joint_acc']:10.3f} "
              f"{row['seen']['color_acc']:10.3f} {row['seen']['shape_acc']:10.3f}", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
