"""Speed, correctness and fidelity of the sampler for one checkpoint on ``shapes``: seconds per
image, judged accuracy (seen and held-out prompts) and fidelity to the data's variety (Fréchet
distance against rendered images with its rendered-vs-rendered floor, and the within-prompt spread;
util/evaluation/shapes_fidelity.py) over temperature x num_iter x ODE steps x ODE solver x guidance scale.

    python benchmarks/bench_sample.py output/shapes/checkpoint-last.pth
    python benchmarks/bench_sample.py CKPT --temperature 0.05,0.5,1.0 --num_iter 8,16 --ode_steps 5,10,20 \
        --solvers heun --guidance 3 --per_combo 8

CFG 1.0 means no guidance, which also skips the null-condition rows. Timings are wall-clock
seconds per image for the whole judged set (generation only), measured in one run.
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
from models.jepat import JEPAT, JEPATConfig  # noqa: E402
from models.sampler import SamplingConfig  # noqa: E402
from models.tokenizers import build_tokenizer  # noqa: E402
from util.data import shapes  # noqa: E402
from util.data.captions import build_caption_store  # noqa: E402
from util.evaluation import judge  # noqa: E402
from util.evaluation.generate import ImageGenerator  # noqa: E402
from util.evaluation.shapes_eval import shapes_prompts  # noqa: E402
from util.evaluation.shapes_fidelity import fidelity  # noqa: E402
from util.runtime import init_runtime, resolve_precision  # noqa: E402
from util.training.checkpoint import checkpoint_recipe, load_checkpoint  # noqa: E402


def ints(s: str):
    return [int(x) for x in s.split(",") if x]


def floats(s: str):
    return [float(x) for x in s.split(",") if x]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--num_iter", default="4,16", help="comma-separated unmasking steps")
    p.add_argument("--ode_steps", default="5,20", help="comma-separated flow ODE steps")
    p.add_argument("--solvers", default="heun", help="comma-separated ODE solvers")
    p.add_argument("--guidance", default="3", help="comma-separated guidance scales (1: no guidance)")
    p.add_argument("--temperature", default=None, help="comma-separated temperatures (default: the training run's)")
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
    splits = {
        "seen": shapes_prompts(shapes.SEEN_COMBOS, a.per_combo),
        "heldout": shapes_prompts(shapes.HELDOUT_COMBOS, a.per_combo),
    }
    table.add([p for prompts, _ in splits.values() for p in prompts])
    temperatures = floats(a.temperature) if a.temperature else [recipe["sampling"]["temperature"]]
    print(
        f"checkpoint {a.checkpoint} (step {ckpt['state']['step']}), device {device}, precision {precision}, "
        f"{a.per_combo} images per combination "
        f"({len(splits['seen'][0])} seen + {len(splits['heldout'][0])} held-out), {torch.get_num_threads()} threads"
    )
    # one untimed warm-up so the first row does not pay for lazy initialisation
    warm = SamplingConfig(num_iter=2, ode_steps=1)
    ImageGenerator(model, table, tokenizer, warm, device, precision).generate(splits["seen"][0][:2], a.seed)
    header = (
        f"{'temp':>5} {'iter':>4} {'ode':>3} {'solver':>7} {'guide':>5} {'s/image':>8} | {'seen':>5} {'held':>5} | "
        f"{'FD seen':>7} {'floor':>5} {'spread':>6} | {'FD held':>7} {'floor':>5} {'spread':>6}"
    )
    print(header)
    rows = []
    for temperature, num_iter, ode, solver, guidance in itertools.product(
        temperatures, ints(a.num_iter), ints(a.ode_steps), a.solvers.split(","), floats(a.guidance)
    ):
        sampling = SamplingConfig(
            num_iter=num_iter,
            guidance_scale=guidance,
            temperature=temperature,
            ode_steps=ode,
            guidance_schedule=recipe["sampling"].get("guidance_schedule", "linear"),
            ode_solver=solver,
        )
        row = {
            "temperature": temperature,
            "num_iter": num_iter,
            "ode_steps": ode,
            "ode_solver": solver,
            "guidance_scale": guidance,
        }
        seconds, count = 0.0, 0
        for offset, (split, (prompts, targets)) in enumerate(splits.items()):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            images = ImageGenerator(model, table, tokenizer, sampling, device, precision).generate(
                prompts, a.seed + offset
            )
            seconds += time.perf_counter() - t0
            count += len(prompts)
            row[split] = {
                **judge.score(judge.judge_batch(images), targets),
                **fidelity(images, targets, a.seed + offset),
            }
        row["seconds_per_image"] = seconds / count
        rows.append(row)
        s, h = row["seen"], row["heldout"]
        print(
            f"{temperature:5.2f} {num_iter:4d} {ode:3d} {solver:>7} {guidance:5.1f} {row['seconds_per_image']:8.4f} | "
            f"{s['joint_acc']:5.3f} {h['joint_acc']:5.3f} | {s['fd']:7.1f} {s['fd_floor']:5.1f} {s['spread']:6.2f} | "
            f"{h['fd']:7.1f} {h['fd_floor']:5.1f} {h['spread']:6.2f}",
            flush=True,
        )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
