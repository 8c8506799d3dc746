"""Where a process runs: its device, its precision and its place in a ``torchrun`` process group.
The one helper of the three mains and of evaluation.

    python main_jepat.py ...                                   # one process, no process group
    torchrun --nproc_per_node 8 main_jepat.py ...              # 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 main_jepat.py --device cpu ... # two CPU processes (gloo)
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from huggingface_hub.utils import disable_progress_bars

from models.safe_load import CheckpointFileError
from util.errors import UserError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class DistEnv:
    """Where this process sits. ``world_size == 1`` and ``initialized == False`` for a plain run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    control: Any | None = None  # a gloo group for host-side flags (never syncs the GPU stream)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def max_over_ranks(self, value: int) -> int:
        """The largest ``value`` over the ranks, on every rank (a host-side all-reduce on the
        gloo control group: it never waits for the GPU)."""
        if not self.initialized:
            return value
        t = torch.tensor([int(value)], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control)
        return int(t.item())

    def max_over_ranks_async(self, value: int) -> Callable[[], int]:
        """Start :meth:`max_over_ranks` and return a function that waits for its result, so that the
        round trip (across nodes: a network latency) overlaps the work done in between."""
        if not self.initialized:
            return lambda: value
        t = torch.tensor([int(value)], dtype=torch.int64)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.control, async_op=True)

        def result() -> int:
            work.wait()
            return int(t.item())

        return result

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a small picklable object, over the gloo control group)."""
        if not self.initialized:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, group=self.control)
        return box[0]

    def gather_to_main(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` (picklable, on the host), in rank order, on rank 0; None on the others.
        Over the gloo control group: a GPU backend's object collectives would stage it in device memory."""
        if not self.initialized:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(value, out, dst=0, group=self.control)
        return out

    def all_ranks(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on all of them."""
        return not self.max_over_ranks(int(not flag))

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier(group=self.control)


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def _device(name: str, local_rank: int, distributed: bool) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if not name.startswith("cuda"):
        return torch.device(name)
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}, but this process sees no GPU; use --device cpu")
    if ":" in name and distributed and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
        raise UserError(
            f"--device {name} names one GPU, but torchrun starts several processes per node; "
            "pass --device cuda (each process takes the GPU of its LOCAL_RANK)"
        )
    device = torch.device("cuda", int(name.split(":")[1]) if ":" in name else local_rank)
    torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("high")  # TF32 for the fp32 matmuls left outside autocast
    return device


def init_runtime(device_name: str = "auto", timeout_min: float = 30.0) -> DistEnv:
    """Join the process group that torchrun describes in the environment (env:// rendezvous;
    NCCL on GPUs, gloo on the CPU), or describe a single process.

    ``device_name``: ``auto`` (the GPU of this process's LOCAL_RANK if there is one, else the
    CPU), ``cpu``, ``cuda`` (the LOCAL_RANK's GPU) or ``cuda:i`` (one process per node only).
    """
    if not launched_by_torchrun():
        return DistEnv(device=_device(device_name, 0, distributed=False))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    device = _device(device_name, local, distributed=True)
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    if not dist.is_initialized():
        # one node: the store torchrun's agent serves outlives a restart of the workers (--max_restarts),
        # so the keys of each attempt go under a prefix of their own, or the new ranks would read the
        # addresses of the dead ones and fail to connect. Across nodes the agents' restart counts
        # need not agree (an agent restarts healthy workers when another node rejoins without
        # counting it), so there the keys stay as torch's rendezvous gives them.
        store, _, _ = next(dist.rendezvous("env://", rank, world, timeout=timeout))
        one_node = int(os.environ.get("LOCAL_WORLD_SIZE", world)) == world
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") if one_node else "any"
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"jepat/attempt_{attempt}", store),
            rank=rank,
            world_size=world,
            timeout=timeout,
            device_id=device if backend == "nccl" else None,
        )
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, initialized=True, control=control)


def shutdown_runtime(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


def cpu_bf16_flags() -> bool | None:
    """Whether the CPU announces native bf16 matmuls (avx512_bf16 or amx_bf16 in /proc/cpuinfo);
    None where the file is missing (not Linux)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


@functools.lru_cache(maxsize=1)
def cpu_bf16_speedup(n: int = 512, reps: int = 3) -> float:
    """fp32 over bf16 time of an n x n matmul on this CPU (> 1: bf16 is faster), measured once
    per process; 0 without measuring where the CPU announces no native bf16."""
    if cpu_bf16_flags() is False:
        return 0.0
    times = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        times[dtype] = time.perf_counter() - t0
    return times[torch.float32] / times[torch.bfloat16]


def resolve_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 on GPUs (fp16 where bf16 is missing); on the CPU, bf16 only where it is
    measured faster (``cpu_bf16_speedup``): without AVX-512-BF16 or AMX, bf16 matmuls are
    emulated and 10-30x slower than fp32 (benchmarks/README.md)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    if device.type == "cuda":
        if precision in ("auto", "bf16") and not torch.cuda.is_bf16_supported():
            log.warning("this GPU has no bf16; using fp16 with a GradScaler")
            return "fp16"
        return "bf16" if precision == "auto" else precision
    if precision == "auto":
        return "bf16" if cpu_bf16_speedup() > 1.1 else "fp32"
    if precision == "fp16":
        raise ValueError("--precision fp16 needs a CUDA device; use bf16 or fp32 on the CPU")
    return precision


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on the given device type, or nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def user_errors():
    """For a script's ``__main__``: a setting or file the user passed that is wrong, missing,
    unreadable or refused ends the run with its one-line message (exit status 1), not a traceback."""
    try:
        yield
    except (UserError, CheckpointFileError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None


def setup_logging(env: DistEnv | None = None) -> None:
    """INFO lines with time and module on rank 0; warnings only on the other ranks. Off a terminal,
    the Hugging Face libraries' progress bars are switched off too (a log file gets lines, not frames)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if env is not None and not env.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    if not interactive():
        disable_progress_bars()  # read by transformers when it is imported
        if "transformers" in sys.modules:
            sys.modules["transformers"].utils.logging.disable_progress_bar()


def interactive() -> bool:
    """Whether progress bars make sense: stderr (where tqdm draws) is a terminal. In a log file a
    bar is megabytes of carriage-return frames, so the loops log one line per interval instead."""
    return sys.stderr.isatty()
