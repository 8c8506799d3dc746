"""Running one training across processes: ``torchrun`` (env:// rendezvous) or a plain single process.

    python main_jepat.py ...                                   # one process, no process group
    torchrun --nproc_per_node 8 main_jepat.py ...              # DDP over 8 GPUs (NCCL)
    torchrun --nproc_per_node 2 main_jepat.py --device cpu ... # two CPU processes (gloo)

What lives here: process-group setup (``DistEnv``), per-(step, shard) seeding, the wrappers that
make one training step a single ``forward`` (DDP needs that to reduce gradients, FSDP to gather
parameters), DDP / FSDP2 / activation checkpointing / torch.compile, and the gathering of full
state dicts so that every checkpoint is a plain one, whatever the strategy.

Randomness: the random draws of optimizer step ``s`` on shard ``k`` (``k = rank * accum_iter +
micro_step``) come from generators seeded with a pure function of (seed, s, k). So ranks draw
differently, a resumed run draws what the uninterrupted one drew, and N ranks x A accumulation
steps draw exactly what N*A ranks (or one process with N*A accumulation steps) would.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from models.jepat import JEPAT, training_losses
from models.text_encoders import TextEmbeddings

log = logging.getLogger(__name__)

STRATEGIES = ("ddp", "fsdp")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    """The ``distributed`` argument group of main_jepat.py."""
    g = p.add_argument_group("distributed (torchrun) and memory")
    g.add_argument("--strategy", default="ddp", choices=STRATEGIES,
                   help="under torchrun: ddp (replicated weights) or fsdp (FSDP2 fully_shard, for huge)")
    g.add_argument("--accum_iter", type=int, default=1,
                   help="micro-batches per optimizer step (global batch = batch_size x processes x accum_iter)")
    g.add_argument("--grad_checkpointing", action="store_true",
                   help="recompute encoder/predictor blocks in the backward pass (activation checkpointing)")
    g.add_argument("--compile", action="store_true", help="torch.compile the training step")
    g.add_argument("--compile_backend", default="inductor", choices=COMPILE_BACKENDS)
    g.add_argument("--dist_timeout_min", type=float, default=30.0,
                   help="collective timeout (checkpoint gathers and evaluation on rank 0 must fit in it)")


# -------------------------------------------------------------------- process group
@dataclass
class DistEnv:
    """Where this process sits. ``world_size == 1`` and ``initialized == False`` for a plain run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized: bool = False
    control: Optional[Any] = None   # a gloo group for host-side flags (never syncs the GPU stream)

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

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on at least one."""
        return bool(self.max_over_ranks(int(flag)))

    def all_ranks(self, flag: bool) -> bool:
        return not self.any_rank(not flag)

    def barrier(self) -> None:
        if self.initialized:
            dist.barrier(group=self.control)


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def init_distributed(device_name: str, timeout_min: float = 30.0) -> DistEnv:
    """Join the process group that torchrun describes in the environment (env:// rendezvous),
    NCCL on GPUs and gloo on the CPU; or return a single-process ``DistEnv``.

    ``device_name``: ``auto`` (the GPU of this process's LOCAL_RANK if there is one, else the
    CPU), ``cpu``, or ``cuda`` (the LOCAL_RANK's GPU). A fixed ``cuda:i`` is refused under
    torchrun with more than one process per node.
    """
    if not launched_by_torchrun():
        if device_name == "auto":
            device_name = "cuda" if torch.cuda.is_available() else "cpu"
        return DistEnv(device=torch.device(device_name))
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if device_name == "auto":
        device_name = "cuda" if torch.cuda.is_available() else "cpu"
    if device_name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device_name} under torchrun, but this process sees no GPU; use --device cpu")
        if ":" in device_name and int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > 1:
            raise SystemExit(f"--device {device_name} names one GPU, but torchrun starts several processes per "
                             "node; pass --device cuda (each process takes the GPU of its LOCAL_RANK)")
        index = int(device_name.split(":")[1]) if ":" in device_name else local
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    timeout = datetime.timedelta(minutes=timeout_min)
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=timeout,
                            device_id=device if backend == "nccl" else None)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else None
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, initialized=True, control=control)


def destroy_distributed(env: DistEnv) -> None:
    if env.initialized and dist.is_initialized():
        dist.destroy_process_group()


# -------------------------------------------------------------------- randomness
def step_seed(seed: int, step: int, shard: int) -> int:
    """The seed of the random draws of optimizer step ``step`` on shard ``shard`` (a 63-bit mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + shard * 0x94D049BB133111EB) & (2 ** 64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2 ** 64 - 1)
    return (x ^ (x >> 32)) & (2 ** 63 - 1)


def seed_step(seed: int, step: int, shard: int, host_generator: torch.Generator) -> None:
    """Seed the global generators (CPU and every GPU: masking orders, CFG dropout, flow noise,
    dropout) and the host generator (mask ratio) for one micro-batch."""
    s = step_seed(seed, step, shard)
    torch.manual_seed(s)
    host_generator.manual_seed(s ^ 0x5DEECE66D)


# -------------------------------------------------------------------- the training step as one forward
class EMATarget(nn.Module):
    """``forward(x, text, drop)`` = the EMA's JEPA targets [B,L,D]: one forward, so that a sharded
    EMA gathers its parameters through FSDP's hooks."""

    def __init__(self, ema: JEPAT) -> None:
        super().__init__()
        self.ema = ema

    @torch.no_grad()
    def forward(self, x: torch.Tensor, text: TextEmbeddings, drop: torch.Tensor) -> torch.Tensor:
        return self.ema.encode_full(x, self.ema.condition(text, drop))


class _TargetCall:
    """What ``training_losses`` needs from the EMA (``condition`` then ``encode_full``), served
    by one ``EMATarget`` forward."""

    def __init__(self, target: EMATarget) -> None:
        self.target = target

    def condition(self, text: TextEmbeddings, drop: torch.Tensor):
        return text, drop

    def encode_full(self, x: torch.Tensor, cond) -> torch.Tensor:
        return self.target(x, *cond)


class TrainingLoss(nn.Module):
    """``forward(x, text, host_generator, flow_weight, jepa_weight)`` = ``training_losses`` of the
    wrapped model. The EMA is held outside the module tree: DDP must not broadcast it and FSDP
    must not shard it with the model."""

    def __init__(self, model: JEPAT, ema: JEPAT | EMATarget) -> None:
        super().__init__()
        self.model = model
        self._ema = (ema,)

    def forward(self, x: torch.Tensor, text: TextEmbeddings, host_generator: torch.Generator,
                flow_weight: float, jepa_weight: float) -> Dict[str, torch.Tensor]:
        ema = self._ema[0]
        if isinstance(ema, EMATarget):
            ema = _TargetCall(ema)
        return training_losses(self.model, ema, x, text, host_generator, flow_weight, jepa_weight)


def apply_activation_checkpointing(model: JEPAT) -> int:
    """Wrap every encoder and predictor block so that its activations are recomputed in the
    backward pass. State-dict keys are unchanged (the wrapper strips its own prefix)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    n = 0
    for blocks in (model.encoder_blocks, model.predictor_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
            n += 1
    return n


def _clean_fqn(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _shard_jepat(model: JEPAT, mesh, mp_policy) -> None:
    """FSDP2 units: each transformer block, the flow head, the JEPA head (the root takes the rest)."""
    from torch.distributed.fsdp import fully_shard
    for blocks in (model.encoder_blocks, model.predictor_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model.flow_head, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model.jepa_head, mesh=mesh, mp_policy=mp_policy)


class Parallel:
    """The model as it trains in this process: plain, DDP, or FSDP2, optionally with activation
    checkpointing and torch.compile. ``model`` and ``ema`` stay the JEPAT objects the caller built
    (under FSDP their parameters become shards); checkpoints always hold full, plain state dicts.

    Attributes:
        train_module: callable(x, text, host_generator, flow_weight, jepa_weight) -> losses,
            or None for a plain single process (the engine then calls ``training_losses``).
        ema_for_update: what the engine lerps towards the model (sharded like it under FSDP).
    """

    def __init__(self, env: DistEnv, model: JEPAT, ema: JEPAT, strategy: str = "ddp", precision: str = "fp32",
                 grad_checkpointing: bool = False, compile: bool = False, compile_backend: str = "inductor",
                 find_unused_parameters: bool = False) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        self.env, self.model, self.ema = env, model, ema
        self.strategy = strategy if env.initialized else "single"
        if strategy == "fsdp" and not env.initialized:
            log.warning("--strategy fsdp needs torchrun; running as a single process")
        if grad_checkpointing:
            log.info("activation checkpointing on %d blocks", apply_activation_checkpointing(model))
        self.ema_for_update: nn.Module = ema
        self._ddp = None
        self._fsdp_root = None
        module: Optional[nn.Module] = None
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP
            ids = [env.device.index] if env.device.type == "cuda" else None
            self._ddp = DDP(TrainingLoss(model, ema), device_ids=ids, find_unused_parameters=find_unused_parameters,
                            gradient_as_bucket_view=True)
            module = self._ddp
        elif self.strategy == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
            mesh = init_device_mesh(env.device.type, (env.world_size,))
            dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
            # parameters are gathered in the compute dtype, gradients reduced in fp32; inputs stay
            # as they are (the flow targets must not be rounded to bf16)
            mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
            _shard_jepat(model, mesh, mp)
            root = TrainingLoss(model, None)
            fully_shard(root, mesh=mesh, mp_policy=mp)
            _shard_jepat(ema, mesh, mp)
            target = EMATarget(ema)
            fully_shard(target, mesh=mesh, mp_policy=mp, reshard_after_forward=True)
            root._ema = (target,)
            self._fsdp_root = root
            module = root
        elif compile:
            module = TrainingLoss(model, ema)
        if compile and module is not None:
            module = torch.compile(module, backend=compile_backend)
        self.train_module = module

    # ------------------------------------------------------------ the step
    def grad_sync(self, sync: bool) -> ContextManager:
        """No gradient all-reduce / reduce-scatter on the inner micro-steps of an accumulation."""
        if self._ddp is not None and not sync:
            return self._ddp.no_sync()
        if self._fsdp_root is not None:
            self._fsdp_root.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (the log-interval metrics)."""
        if self.env.initialized:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------ state
    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def _full_state(self, module: nn.Module) -> Optional[Dict[str, torch.Tensor]]:
        if self.strategy != "fsdp":
            return module.state_dict()
        from torch.distributed.checkpoint.state_dict import get_model_state_dict
        sd = get_model_state_dict(module, options=self._options())      # a collective: every rank calls it
        return {_clean_fqn(k): v for k, v in sd.items()} if self.env.is_main else None

    def model_state(self) -> Optional[Dict[str, torch.Tensor]]:
        """The full model state dict on rank 0 (None on the others); FSDP gathers the shards."""
        return self._full_state(self.model)

    def ema_state(self) -> Optional[Dict[str, torch.Tensor]]:
        return self._full_state(self.ema)

    def _param_names(self, optimizer: torch.optim.Optimizer) -> List[str]:
        """Clean FQNs in the optimizer's own order (the ids of a plain optimizer state dict)."""
        names = {id(p): _clean_fqn(n) for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> Optional[Dict[str, Any]]:
        """The optimizer state in the plain (integer-id) format on rank 0, whatever the strategy,
        so that DDP and FSDP checkpoints resume each other."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        osd = get_optimizer_state_dict(self.model, optimizer, options=self._options())
        if not self.env.is_main:
            return None
        index = {n: i for i, n in enumerate(self._param_names(optimizer))}
        state = {index[_clean_fqn(k)]: v for k, v in osd["state"].items()}
        groups = [{**g, "params": [index[_clean_fqn(k)] for k in g["params"]]} for g in osd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
        """Load a plain optimizer state dict (every rank passes the full one)."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        names = self._param_names(optimizer)
        fqn = {"state": {names[i]: v for i, v in state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(self.model, optimizer, fqn, options=self._options())

    def plain_ema(self) -> Optional[JEPAT]:
        """An unsharded EMA for sampling on rank 0 (None elsewhere). FSDP: a consolidated copy
        (a collective); otherwise the EMA itself."""
        if self.strategy != "fsdp":
            return self.ema if self.env.is_main else None
        sd = self.ema_state()
        if sd is None:
            return None
        plain = JEPAT(copy.deepcopy(self.model.cfg))
        plain.load_state_dict(sd)
        return plain.to(self.env.device).requires_grad_(False).eval()

    def all_finite(self) -> bool:
        """Every weight finite on every rank (under FSDP each rank checks its shards)."""
        local = all(bool(torch.isfinite(_local(p)).all()) for p in self.model.parameters())
        return self.env.all_ranks(local)

    def check_replicas(self) -> None:
        """DDP: the model and the EMA must be bitwise the same on every rank; raise if not."""
        if self.strategy != "ddp":
            return
        sums = torch.stack([p.detach().double().sum() for m in (self.model, self.ema) for p in m.parameters()])
        gathered = [torch.empty_like(sums) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, sums)
        if not all(torch.equal(g, gathered[0]) for g in gathered):
            raise RuntimeError("model or EMA replicas differ between ranks; every rank must run the same "
                               "arguments and code (a rank-dependent branch would cause this)")


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
