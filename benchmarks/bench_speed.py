"""Where the time of a train step and of a sampling call goes, and what each speed fix buys.

Every figure is measured in this one run, on this machine, with the same model and inputs:

* train: images/s of our step against the same step with one of the published code's habits put
  back (per-sample numpy orders, the text encoder run on every step for the model and again for
  the EMA, a loss read-back on every step, AdamW's plain loop), and with all of them together;
  FLOP per step from ``torch.utils.flop_counter`` and the achieved share of the measured matmul
  rate.
* sample: seconds per image on the same weights and prompts of the published sampler's cost
  structure (CFG as two full passes, 100 Euler steps), ours with full fusion (both CFG rows in one
  batch, Heun), ours with late fusion (the rows share one backbone pass; text fusion only at the
  revealed positions), and that with fewer ODE steps (``--fast_ode_steps``) or iterations.
  ``--profile`` adds the operators and FLOP share of one two-iteration sampling call.

    python benchmarks/bench_speed.py --preset tiny
    python benchmarks/bench_speed.py --preset base --batch 8 --steps 3 --sample_batch 2 --num_iter 16
    python benchmarks/bench_speed.py --preset base --skip train --sample_batch 2 --num_iter 16 --profile
    python benchmarks/bench_speed.py --preset base --profile   # top operators of one step (torch.profiler)
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import models.jepat as jepat  # noqa: E402
import models.loss as loss_module  # noqa: E402
from engine_jepat import param_groups, update_ema
from models.sampler import SamplingConfig, num_hidden_after, sample_tokens  # noqa: E402
from models.text_encoders import TextEmbeddings, build_text_encoder  # noqa: E402
from util.data.captions import CaptionStore  # noqa: E402
from util.data.shapes import ALL_COMBOS, all_captions  # noqa: E402
from util.runtime import autocast_context  # noqa: E402

# (preset) -> tokens of the published setting: KL-16 latents at 256 px, patch 1 (256 tokens of 16)
# for base/large/huge; the CPU recipe's 16 tokens of 48 pixels for tiny.
GEOMETRY = {"tiny": (16, 48), "base": (256, 16), "large": (256, 16), "huge": (256, 16)}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int = 1024, reps: int = 10) -> float:
    """Measured FLOP/s of an n x n matmul (the device's practical peak for this dtype)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def numpy_orders(batch: int, seq_len: int, device: torch.device, generator=None) -> torch.Tensor:
    """The published code's orders: one numpy shuffle per sample, then a host-to-device copy."""
    orders = []
    for _ in range(batch):
        order = np.arange(seq_len)
        np.random.shuffle(order)
        orders.append(order)
    return torch.as_tensor(np.array(orders), device=device).long()


class Trainer:
    """One training step of ``model`` with switchable habits (all off = our step)."""

    def __init__(
        self, model, encoder, captions: list[str], batch: int, device: torch.device, precision: str, fused: bool
    ) -> None:
        self.model, self.encoder, self.device, self.precision = model, encoder, device, precision
        self.ema = copy.deepcopy(model).requires_grad_(False).eval()
        self.loss, self.target = loss_module.JEPATLoss(), loss_module.EMATarget(self.ema)
        self.table = CaptionStore(encoder, device)
        self.table.add(captions)
        g = torch.Generator().manual_seed(0)
        cfg = model.cfg
        self.x = torch.randn(batch, cfg.seq_len, cfg.token_dim, generator=g).to(device)
        self.captions = [captions[i % len(captions)] for i in range(batch)]
        self.host = torch.Generator().manual_seed(0)
        self.opt_fused = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), fused=fused)
        self.opt_loop = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), foreach=False)
        self.opt_foreach = torch.optim.AdamW(param_groups(model), lr=1e-4, betas=(0.9, 0.95), foreach=True)
        self.sums = torch.zeros(2, device=device)

    def step(
        self,
        numpy_orders_: bool = False,
        encoder_each_step: bool = False,
        item_each_step: bool = False,
        loop_adamw: bool = False,
        foreach_adamw: bool = False,
    ) -> None:
        if encoder_each_step:  # published: the text encoder on every step, for the model and the EMA
            text = self.encoder.encode(self.captions).to(self.device)
            self.encoder.encode(self.captions)
        else:
            text = self.table.lookup(self.captions)
        orders_fn = numpy_orders if numpy_orders_ else loss_module.random_orders
        saved, loss_module.random_orders = loss_module.random_orders, orders_fn
        try:
            with autocast_context(self.device, self.precision):
                out = self.loss(self.model, self.target, self.x, text, self.host)
        finally:
            loss_module.random_orders = saved
        opt = self.opt_loop if loop_adamw else self.opt_foreach if foreach_adamw else self.opt_fused
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 3.0)
        opt.step()
        update_ema(self.ema, self.model, 0.9999)
        if item_each_step:
            float(out["loss"].item())
            sync(self.device)
        else:
            self.sums += torch.stack([out["loss"].detach().float(), torch.ones((), device=self.device)])


def time_steps(fn: Callable[[], None], steps: int, device: torch.device) -> float:
    """Median seconds of ``steps`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def step_flops(trainer: Trainer) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        trainer.step()
    return counter.get_total_flops()


@torch.no_grad()
def sample_reference(model, text: TextEmbeddings, cfg: SamplingConfig, generator: torch.Generator) -> torch.Tensor:
    """The published sampler's cost structure: conditional and unconditional branches as two full
    transformer passes per iteration and two head calls per ODE step (Euler)."""
    mc = model.cfg
    B, L, d = text.pooled.shape[0], mc.seq_len, mc.token_dim
    device = text.pooled.device
    orders = numpy_orders(B, L, device)
    tokens = torch.zeros(B, L, d, device=device)
    cond_c = model.condition(text, torch.zeros(B, dtype=torch.bool, device=device))
    cond_u = model.condition(text, torch.ones(B, dtype=torch.bool, device=device))
    hidden = L
    for step in range(cfg.num_iter):
        z_c = model(tokens, cond_c, orders, hidden)
        z_u = model(tokens, cond_u, orders, hidden)
        hidden_next = num_hidden_after(step, cfg.num_iter, L, hidden)
        reveal = orders[:, hidden_next:hidden]
        idx = reveal[..., None].expand(-1, -1, z_c.shape[-1])
        zc, zu = z_c.gather(1, idx).flatten(0, 1), z_u.gather(1, idx).flatten(0, 1)
        x = torch.randn(zc.shape[0], d, device=device, generator=generator) * cfg.temperature
        dt = 1.0 / cfg.ode_steps
        for i in range(cfg.ode_steps):
            t = torch.full((x.shape[0],), i * dt, device=device)
            v_c = model.flow_head(x, t, zc)
            v_u = model.flow_head(x, t, zu)
            x = x + dt * (v_u + cfg.guidance_scale * (v_c - v_u))
        tokens = tokens.scatter(1, reveal[..., None].expand(-1, -1, d), x.view(B, -1, d).float())
        hidden = hidden_next
    return tokens


def profile_step(trainer: Trainer, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    trainer.step()
    with profile(activities=acts) as prof:
        trainer.step()
    key = "self_cuda_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def sample_variants(a, num_iter: int) -> dict[str, tuple]:
    """name -> (fusion the model runs with, sampler function, SamplingConfig): the published cost
    structure first, then ours step by step."""
    ref = SamplingConfig(
        num_iter=a.ref_num_iter or num_iter,
        guidance_scale=3.0,
        temperature=0.95,
        ode_steps=a.ref_ode_steps,
        ode_solver="euler",
    )
    ours = SamplingConfig(
        num_iter=num_iter, guidance_scale=3.0, temperature=0.95, ode_steps=a.ode_steps, ode_solver="heun"
    )
    fast = SamplingConfig(**{**ours.__dict__, "ode_steps": a.fast_ode_steps, "num_iter": a.fast_num_iter or num_iter})
    return {
        f"published: 2 passes, {ref.ode_steps} Euler, {ref.num_iter} it": ("full", sample_reference, ref),
        f"ours full fusion: 1 batch, {ours.ode_steps} Heun": ("full", None, ours),
        f"ours late_only: shared backbone, {ours.ode_steps} Heun": ("late_only", None, ours),
        f"ours late_only, {fast.ode_steps} Heun, {fast.num_iter} it": ("late_only", None, fast),
    }


def sample_table(model, text: TextEmbeddings, a, num_iter: int, batch: int, rate: float, dtype) -> dict:
    """Seconds per image of each sampling variant on the same weights and prompts, one call each
    after an untimed two-iteration warm-up; with ``--profile``, the operators and FLOP of one
    two-iteration call of the third variant."""
    device = text.pooled.device
    null = torch.zeros(batch, dtype=torch.bool, device=device)
    precision = "bf16" if dtype == torch.bfloat16 else "fp32"
    rows, out = {}, {}
    for name, (fusion, fn, cfg) in sample_variants(a, num_iter).items():
        if any(name.startswith(x) for x in filter(None, a.skip_sample.split(","))):
            continue
        model.cfg.fusion = fusion  # same weights: only the path through them differs
        run = fn or (lambda m, t, c, g: sample_tokens(m, t, null, c, generator=g))
        with autocast_context(device, precision):
            run(
                model,
                text,
                SamplingConfig(**{**cfg.__dict__, "num_iter": 2, "ode_steps": 1}),
                torch.Generator(device=device).manual_seed(0),
            )
            sync(device)
            t0 = time.perf_counter()
            run(model, text, cfg, torch.Generator(device=device).manual_seed(0))
            sync(device)
        rows[name] = (time.perf_counter() - t0) / batch
        print(f"  {name:52s} {rows[name]:8.2f} s/image", flush=True)
    first = next(iter(rows.values()))
    print(f"\nsampling, batch {batch}, CFG 3 ({precision}):")
    print(f"{'variant':52s} {'s/image':>8s} {'x faster than the first':>24s}")
    for name, sec in rows.items():
        print(f"{name:52s} {sec:8.2f} {first / sec:24.2f}")
        out[name] = {"seconds_per_image": sec, "speedup": first / sec}
    model.cfg.fusion = "late_only"
    if a.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        cfg = SamplingConfig(num_iter=2, guidance_scale=3.0, ode_steps=a.ode_steps, ode_solver="heun")
        with autocast_context(device, precision), profile(activities=acts, with_flops=True) as prof:
            t0 = time.perf_counter()
            sample_tokens(model, text, null, cfg, generator=torch.Generator(device=device).manual_seed(0))
            sync(device)
            sec = time.perf_counter() - t0
        flops = sum(e.flops for e in prof.key_averages())
        key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(
            f"\none sampling call of 2 iterations (late_only, {a.ode_steps} Heun): {flops / 1e12:.3f} TFLOP in "
            f"{sec:.2f} s under the profiler = {100 * flops / sec / rate:.0f}% of the measured matmul rate"
        )
        print(prof.key_averages().table(sort_by=key, row_limit=12))
    return out


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=sorted(jepat.JEPAT_MODELS))
    p.add_argument("--batch", type=int, default=None, help="train batch (default: 64 tiny, 8 otherwise)")
    p.add_argument("--steps", type=int, default=5, help="timed train steps per variant (median)")
    p.add_argument(
        "--sample_batch", type=int, default=None, help="images per sampling call (default: 16 tiny, 2 otherwise)"
    )
    p.add_argument(
        "--num_iter", type=int, default=None, help="our sampler's iterations (default: 16 tiny, 64 otherwise)"
    )
    p.add_argument("--ode_steps", type=int, default=20, help="our Heun steps")
    p.add_argument("--ref_num_iter", type=int, default=None, help="published sampler: iterations (default: ours)")
    p.add_argument("--ref_ode_steps", type=int, default=100, help="published sampler: Euler steps")
    p.add_argument("--fast_ode_steps", type=int, default=10, help="the last row's Heun steps")
    p.add_argument("--fast_num_iter", type=int, default=None, help="the last row's iterations (default: ours)")
    p.add_argument("--skip_sample", default="", help="comma list of sampling rows (by name prefix) to leave out")
    p.add_argument(
        "--variants",
        default="",
        help="comma list of train variants to time (default: all); 'ours' and 'all' are the two ends",
    )
    p.add_argument("--skip", default="", help="comma list of sections to skip: train, sample")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--profile", action="store_true", help="print the top operators of one train step")
    p.add_argument("--json", default="", help="also write the results here")
    return p


def main() -> None:
    a = get_args_parser().parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    small = a.preset == "tiny"
    batch = a.batch or (64 if small else 8)
    sample_batch = a.sample_batch or (16 if small else 2)
    num_iter = a.num_iter or (16 if small else 64)
    skip = set(filter(None, a.skip.split(",")))
    seq_len, token_dim = GEOMETRY[a.preset]
    torch.manual_seed(0)
    np.random.seed(0)
    encoder = build_text_encoder("minilm", max_length=32, device=str(device))
    model = jepat.build_model(
        a.preset,
        token_dim=token_dim,
        seq_len=seq_len,
        text_token_dim=encoder.token_dim,
        text_pooled_dim=encoder.pooled_dim,
    ).to(device)
    captions = all_captions(ALL_COMBOS)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    rate = matmul_rate(device, dtype)
    res: dict[str, object] = {
        "preset": a.preset,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "precision": a.precision,
        "matmul_tflops": rate / 1e12,
        "seq_len": seq_len,
    }
    print(
        f"{a.preset}: {sum(q.numel() for q in model.parameters()) / 1e6:.1f}M parameters, {seq_len} tokens of "
        f"{token_dim}; {device} x{torch.get_num_threads()} threads, {a.precision}; "
        f"measured matmul rate {rate / 1e12:.3f} TFLOP/s"
    )

    if "train" not in skip:
        tr = Trainer(model.train(), encoder, captions, batch, device, a.precision, fused=True)
        flops = step_flops(tr)
        variants = {
            "ours": {},
            "+ numpy orders per sample": {"numpy_orders_": True},
            "+ text encoder every step (x2)": {"encoder_each_step": True},
            "+ loss.item() every step": {"item_each_step": True},
            "+ AdamW for-loop (not fused)": {"loop_adamw": True},
            "+ AdamW foreach (not fused)": {"foreach_adamw": True},
            "all published habits": {
                "numpy_orders_": True,
                "encoder_each_step": True,
                "item_each_step": True,
                "loop_adamw": True,
            },
        }
        if a.variants:
            keep = {v.strip() for v in a.variants.split(",")}
            variants = {
                k: v
                for k, v in variants.items()
                if k == "ours" or (k == "all published habits" and "all" in keep) or k in keep
            }
        rows = {}
        for name, kw in variants.items():
            sec = time_steps(lambda: tr.step(**kw), a.steps, device)
            rows[name] = sec
        base = rows["ours"]
        print(f"\ntrain step, batch {batch}: {flops / 1e12:.3f} TFLOP per step (flop_counter)")
        print(f"{'variant':34s} {'s/step':>8s} {'img/s':>8s} {'ours is x faster':>17s}")
        for name, sec in rows.items():
            print(f"{name:34s} {sec:8.3f} {batch / sec:8.2f} {sec / base:17.2f}")
        share = flops / base / rate
        print(f"ours: {flops / base / 1e12:.3f} TFLOP/s achieved = {100 * share:.0f}% of the measured matmul rate")
        res["train"] = {
            "batch": batch,
            "tflop_per_step": flops / 1e12,
            "seconds_per_step": rows,
            "images_per_s": batch / base,
            "matmul_share": share,
        }
        if a.profile:
            print("\n" + profile_step(tr))

    model.eval()
    table = CaptionStore(encoder, device)
    prompts = [captions[i % len(captions)] for i in range(sample_batch)]
    text = table.lookup(prompts)
    if "sample" not in skip:
        res["sample"] = sample_table(model, text, a, num_iter, sample_batch, rate, dtype)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        main()
