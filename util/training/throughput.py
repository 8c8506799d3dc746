"""What the training log reports of speed: images per second, achieved FLOP/s (the FLOPs of a
training micro-batch counted once by ``torch.utils.flop_counter``) and their share of the
device's peak (the datasheet's dense bf16 / TF32 figure for known GPUs, else a measured matmul rate)."""

from __future__ import annotations

import logging
import math
import time
import traceback
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    ``torch.utils.flop_counter`` in eager mode (compiled parts run eagerly here: no graph is
    traced under the counter, so counting adds no recompile)."""
    from torch.utils.flop_counter import FlopCounterMode  # imports triton where installed: only when counting

    counter = FlopCounterMode(display=False)
    with torch.compiler.set_stance("force_eager"), counter:
        step()
    return int(counter.get_total_flops())


class HostSyncs(TorchDispatchMode):
    """Counts the points where the host waits for ``device_type``: reading a value of a tensor there
    (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``: all ``aten._local_scalar_dense``) and
    blocking copies from there to the host. On the CPU, the rehearsal of the GPU path, every scalar
    read counts. Functions wrapped by ``allow`` are not counted (their reads are counted apart, in
    ``allowed``); ``where`` keeps the stack of each counted one."""

    def __init__(self, device_type: str = "cuda") -> None:
        super().__init__()
        self.device_type = device_type
        self.count, self.allowed, self.where = 0, 0, []
        self._depth = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._waits(func, args, kwargs):
            if self._depth:
                self.allowed += 1
            else:
                self.count += 1
                self.where.append("".join(traceback.format_stack(limit=8)[:-2]))
        return func(*args, **kwargs)

    def _waits(self, func, args, kwargs) -> bool:
        if func is torch.ops.aten._local_scalar_dense.default:
            return args[0].device.type == self.device_type
        if self.device_type != "cpu" and func is torch.ops.aten._to_copy.default:
            to = kwargs.get("device")
            to_host = to is not None and torch.device(to).type == "cpu"
            return args[0].device.type == self.device_type and to_host and not kwargs.get("non_blocking", False)
        return False

    def allow(self, fn: Callable) -> Callable:
        """``fn`` with its host syncs counted as allowed (log read-backs, host-side draws)."""

        def wrapped(*a, **k):
            self._depth += 1
            try:
                return fn(*a, **k)
            finally:
                self._depth -= 1

        return wrapped
