"""What the training log reports of speed: images per second, achieved FLOP/s (the FLOPs of a
training micro-batch counted once by ``torch.utils.flop_counter``) and their share of the
device's peak (the datasheet's dense bf16 / TF32 figure for known GPUs, else a measured matmul rate)."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

log = logging.getLogger(__name__)

# dense (no sparsity) tensor-core peaks, FLOP/s, of the SXM parts: bf16/fp16 and TF32
GPU_PEAKS = {
    "H200": (989e12, 495e12),
    "H100": (989e12, 495e12),
    "A100": (312e12, 156e12),
    "B200": (2250e12, 1100e12),
    "L40S": (362e12, 183e12),
}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 3) -> float:
    """Best FLOP/s of an n x n matmul in ``dtype`` (its operands drawn from a generator of its own:
    the global random state is left as it was)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    best = math.inf
    for _ in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: torch.device, precision: str) -> tuple[float, str]:
    """(FLOP/s, where the figure comes from) of this device at ``precision``."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (half, tf32) in GPU_PEAKS.items():
            if key in name:
                return (half if precision in ("bf16", "fp16") else tf32), f"{key} datasheet"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    n = 4096 if device.type == "cuda" else 1024
    return matmul_rate(device, dtype, n), f"measured {n}x{n} {precision} matmul"


def count_flops(step: Callable[[], None]) -> int:
    """The FLOPs ``step`` runs (matmuls and attention, forward and backward), counted by
    ``torch.utils.flop_counter`` in eager mode."""
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())
