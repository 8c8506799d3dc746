"""A browser demo of a trained JEPA-T: prompts in, a grid of samples out, and the canvas after each
unmasking iteration, so you can watch MAR-style generation fill the image in.

    python app.py --checkpoint output/shapes/checkpoint-last.pth       # then open http://127.0.0.1:7860
    python app.py --checkpoint exported/shapes --port 8080             # a model folder (main_sample.py --export_dir)

The page is served on localhost only and loads nothing from outside (no analytics, no web fonts,
no share link). Sampling goes through the same ``ImageGenerator`` as ``main_sample.py``: a seed
gives the same images here and there. In the iteration frames, grey marks the tokens still hidden.
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.utils import make_grid

from models.flow_head import ODE_SOLVERS
from models.sampler import GUIDANCE_SCHEDULES, SamplingConfig, num_hidden_after
from util.evaluation.generate import ImageGenerator
from util.pretrained import Pretrained, build_generator, load_pretrained
from util.runtime import PRECISIONS, init_runtime, resolve_precision, setup_logging, user_errors

if TYPE_CHECKING:
    import gradio as gr

log = logging.getLogger("jepat.app")

MAX_IMAGES = 64  # prompts x images per prompt, per request
DISPLAY_PX = 128  # small images are enlarged (nearest neighbour) to at least this size on the page
LIMITS = {
    "images per prompt": (1, 16),
    "guidance scale": (1.0, 20.0),
    "temperature": (0.01, 5.0),
    "iterations": (1, 1024),
    "ODE steps": (1, 200),
    "seed": (0, 2**31 - 1),
}


class RequestError(ValueError):
    """Input the page cannot sample from; the message is shown on the page."""


@dataclass
class Request:
    prompts: list[str]  # one entry per prompt ("" = unconditional)
    per_prompt: int
    sampling: SamplingConfig
    seed: int
    notes: list[str]  # said on the page beside the result


def _number(name: str, value: float | None, integer: bool, problems: list[str]) -> float:
    low, high = LIMITS[name]
    if value is None:
        problems.append(f"{name} is empty (give a value from {low} to {high})")
        return low
    if integer and value != int(value):
        problems.append(f"{name} must be a whole number, got {value}")
    if not low <= value <= high:
        problems.append(f"{name} must be between {low} and {high}, got {value:g}")
    return int(value) if integer else float(value)


def parse_request(
    text: str,
    per_prompt: float | None,
    guidance: float | None,
    schedule: str,
    temperature: float | None,
    num_iter: float | None,
    ode_steps: float | None,
    solver: str,
    seed: float | None,
    seq_len: int,
) -> Request:
    """The page's inputs checked and turned into a request; RequestError lists every problem."""
    problems: list[str] = []
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    notes = [] if prompts else ["The prompt is empty: the images are unconditional (the learned null condition)."]
    prompts = prompts or [""]
    n = _number("images per prompt", per_prompt, True, problems)
    sampling = SamplingConfig(
        num_iter=_number("iterations", num_iter, True, problems),
        guidance_scale=_number("guidance scale", guidance, False, problems),
        guidance_schedule=schedule,
        temperature=_number("temperature", temperature, False, problems),
        ode_steps=_number("ODE steps", ode_steps, True, problems),
        ode_solver=solver,
    )
    seed_value = _number("seed", seed, True, problems)
    if schedule not in GUIDANCE_SCHEDULES or solver not in ODE_SOLVERS:
        problems.append(f"choose a schedule from {GUIDANCE_SCHEDULES} and an ODE solver from {ODE_SOLVERS}")
    if not problems and len(prompts) * n > MAX_IMAGES:
        problems.append(f"{len(prompts)} prompts x {n} images is more than {MAX_IMAGES} images; ask for fewer")
    if problems:
        raise RequestError("; ".join(problems))
    if sampling.num_iter > seq_len:
        notes.append(f"{sampling.num_iter} iterations is more than the {seq_len} tokens: using {seq_len}.")
        sampling.num_iter = seq_len
    return Request(prompts, n, sampling, seed_value, notes)


def to_grid(images: torch.Tensor, nrow: int) -> Image.Image:
    """images [N,3,H,W] in [-1,1] -> one PIL grid (a row per prompt), enlarged to DISPLAY_PX per image."""
    grid = make_grid((images.clamp(-1, 1) + 1) / 2, nrow=nrow, padding=1, pad_value=1.0)  # [3,Hg,Wg]
    scale = max(1, math.ceil(DISPLAY_PX / images.shape[-1]))
    pixels = (grid.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    picture = Image.fromarray(pixels)
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)


def known_after_each_step(num_iter: int, seq_len: int) -> list[int]:
    """How many tokens are decided after each unmasking step (the sampler's cosine schedule)."""
    hidden, known = seq_len, []
    for step in range(num_iter):
        hidden = num_hidden_after(step, num_iter, seq_len, hidden)
        known.append(seq_len - hidden)
    return known


def generate(
    gen: ImageGenerator, request: Request, show_steps: bool, workdir: Path
) -> tuple[Image.Image, list[tuple[Image.Image, str]], str | None]:
    """(grid, [(canvas after iteration k, caption)], path of the animated GIF or None). One batch:
    every image is seeded by (seed, its index), as in main_sample.py."""
    gen = copy.copy(gen)  # the request's sampling settings, not the page's defaults
    gen.sampling = request.sampling
    expanded = [p for p in request.prompts for _ in range(request.per_prompt)]
    canvases: list[torch.Tensor] = []
    on_canvas = (lambda step, images: canvases.append(images)) if show_steps else None
    images = gen.generate_ids(expanded, list(range(len(expanded))), request.seed, on_canvas)
    grid = to_grid(images, request.per_prompt)
    if not show_steps:
        return grid, [], None
    L, K = gen.model.cfg.seq_len, len(canvases)
    frames = [to_grid(c, request.per_prompt) for c in canvases]
    captions = [f"{k + 1}/{K}: {n}/{L} tokens" for k, n in enumerate(known_after_each_step(K, L))]
    gif = Path(tempfile.mkstemp(suffix=".gif", prefix="fill_in_", dir=workdir)[1])
    frames[0].save(gif, save_all=True, append_images=frames[1:] + [grid], duration=[300] * K + [2000], loop=0)
    return grid, list(zip(frames, captions)), str(gif)


def describe(pre: Pretrained, gen: ImageGenerator) -> str:
    """The model's card on the page."""
    c, cap, img = pre.model_config, pre.recipe["captions"], pre.recipe["image"]
    return (
        f"**JEPA-T** `{c.get('preset') or 'custom'}` preset, step {pre.step}, from `{pre.source}`: "
        f"{img.get('img_size')} px `{img.get('tokenizer')}` images as {c['seq_len']} tokens, captions by "
        f"`{cap.get('text_encoder')}`, trained on `{cap.get('dataset')}`. Sampling defaults: "
        + ", ".join(f"{k} {v}" for k, v in asdict(gen.sampling).items())
        + "."
    )


def build_demo(pre: Pretrained, gen: ImageGenerator, workdir: Path) -> gr.Blocks:
    """The page: inputs on the left, the grid, the animation and the iteration frames on the right."""
    import gradio as gr  # imported for the page only: requests and generation do without it (3 s)

    s = gen.sampling

    def run(text, per_prompt, guidance, schedule, temperature, num_iter, ode_steps, solver, seed, show_steps):
        try:
            request = parse_request(
                text,
                per_prompt,
                guidance,
                schedule,
                temperature,
                num_iter,
                ode_steps,
                solver,
                seed,
                gen.model.cfg.seq_len,
            )
        except RequestError as e:
            return None, None, [], f"**Not generated:** {e}."
        grid, frames, gif = generate(gen, request, show_steps, workdir)
        n = len(request.prompts) * request.per_prompt
        said = " ".join(request.notes)
        return grid, gif, frames, f"{n} image(s), seed {request.seed}. {said}".strip()

    with gr.Blocks(title="JEPA-T demo", analytics_enabled=False) as demo:
        gr.Markdown(describe(pre, gen))
        with gr.Row():
            with gr.Column(scale=1):
                prompts = gr.Textbox(
                    label="prompts, one per line (empty: unconditional)",
                    lines=3,
                    placeholder="a red circle",
                    elem_id="prompts",
                )
                per_prompt = gr.Number(4, label="images per prompt", precision=0, elem_id="per_prompt")
                guidance = gr.Number(s.guidance_scale, label="guidance scale", elem_id="guidance_scale")
                schedule = gr.Radio(list(GUIDANCE_SCHEDULES), value=s.guidance_schedule, label="guidance schedule")
                temperature = gr.Number(s.temperature, label="temperature", elem_id="temperature")
                num_iter = gr.Number(s.num_iter, label="iterations", precision=0, elem_id="num_iter")
                ode_steps = gr.Number(s.ode_steps, label="ODE steps", precision=0, elem_id="ode_steps")
                solver = gr.Radio(list(ODE_SOLVERS), value=s.ode_solver, label="ODE solver")
                seed = gr.Number(0, label="seed", precision=0, elem_id="seed")
                show_steps = gr.Checkbox(True, label="show the canvas after each iteration")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=2):
                message = gr.Markdown(elem_id="message")
                grid = gr.Image(
                    label="samples (a row per prompt)", type="pil", format="png", interactive=False, elem_id="grid"
                )
                animation = gr.Image(
                    label="filling in, iteration by iteration", type="filepath", interactive=False, elem_id="animation"
                )
                frames = gr.Gallery(
                    label="the canvas after each iteration (grey: still hidden)",
                    columns=4,
                    height="auto",
                    object_fit="contain",
                    format="png",
                    elem_id="frames",
                )
        button.click(
            run,
            [prompts, per_prompt, guidance, schedule, temperature, num_iter, ode_steps, solver, seed, show_steps],
            [grid, animation, frames, message],
        )
    return demo


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("JEPA-T browser demo", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint-*.pth of main_jepat.py, or a model folder")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="address to serve on (127.0.0.1: this machine only)")
    p.add_argument("--text_encoder_path", default=None, help="override the text encoder weights used in training")
    p.add_argument("--vae_path", default=None, help="VAE weights (default: the training run's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=PRECISIONS)
    return p


def main(args: argparse.Namespace) -> None:
    setup_logging()
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # no telemetry or version check from the server
    pre = load_pretrained(args.checkpoint)
    env = init_runtime(args.device)
    overrides = {"text_encoder_path": args.text_encoder_path} if args.text_encoder_path else {}
    gen = build_generator(
        pre, env.device, resolve_precision(env.device, args.precision), None, overrides, args.vae_path
    )
    workdir = Path(tempfile.mkdtemp(prefix="jepat_app_"))
    demo = build_demo(pre, gen, workdir)
    log.info("serving on http://%s:%d", args.host, args.port)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        share=False,
        show_error=True,
        footer_links=[],
        allowed_paths=[str(workdir)],
    )


if __name__ == "__main__":
    with user_errors():
        main(get_args_parser().parse_args())
