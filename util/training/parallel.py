"""The model as it trains in this process: plain, DDP or FSDP2, optionally with activation
checkpointing and torch.compile, always behind one ``train_module`` (so the engine has one loss
path), with the gathering of full state dicts so that every checkpoint is a plain one.

Compile: each transformer block and the flow head are compiled on their own (``fullgraph``),
before activation checkpointing and before DDP / FSDP2 wrap them, so that the wrappers' hooks stay
outside the graphs and no graph breaks at a block boundary. The masking (a host-side draw of the
number of hidden tokens), the gathers and the losses between them run eagerly: the number of
tokens a block sees changes every step, which dynamo marks dynamic after the first change, so each
compiled code object holds at most two graphs however many steps run.

Randomness: the random draws of optimizer step ``s`` on shard ``k`` (``k = rank * accum_iter +
micro_step``) come from generators seeded with a pure function of (seed, s, k). So ranks draw
differently, a resumed run draws what the uninterrupted one drew, and N ranks x A accumulation
steps draw exactly what N*A ranks (or one process with N*A accumulation steps) would.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.nn.parallel import DistributedDataParallel

from models.jepat import JEPAT
from models.loss import EMATarget, JEPATLoss
from models.text_encoders import TextEmbeddings
from util.config import STRATEGIES
from util.runtime import DistEnv

log = logging.getLogger(__name__)


# -------------------------------------------------------------------- randomness
def step_seed(seed: int, step: int, shard: int) -> int:
    """The seed of the random draws of optimizer step ``step`` on shard ``shard`` (a 63-bit mix)."""
    x = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + shard * 0x94D049BB133111EB) & (2**64 - 1)
    x ^= x >> 31
    x = (x * 0xD6E8FEB86659FD93) & (2**64 - 1)
    return (x ^ (x >> 32)) & (2**63 - 1)


def seed_step(seed: int, step: int, shard: int, host_generator: torch.Generator) -> None:
    """Seed the global generators (CPU and every GPU: masking orders, CFG dropout, flow noise,
    dropout) and the host generator (mask ratio) for one micro-batch."""
    s = step_seed(seed, step, shard)
    torch.manual_seed(s)
    host_generator.manual_seed(s ^ 0x5DEECE66D)


# -------------------------------------------------------------------- the training step as one forward
class TrainingStep(nn.Module):
    """``forward(x, text, host_generator)`` = ``loss(model, target, ...)``. The EMA target is held
    outside the module tree: DDP must not broadcast it and FSDP must not shard it with the model."""

    def __init__(self, model: JEPAT, loss: JEPATLoss, target: EMATarget | None) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self._target = (target,)

    def forward(
        self, x: torch.Tensor, text: TextEmbeddings, host_generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        return self.loss(self.model, self._target[0], x, text, host_generator)


def apply_activation_checkpointing(model: JEPAT) -> int:
    """Wrap every encoder and predictor block so that its activations are recomputed in the
    backward pass. State-dict keys are unchanged (the wrapper strips its own prefix)."""
    n = 0
    for blocks in (model.encoder_blocks, model.predictor_blocks):
        for i, block in enumerate(blocks):
            blocks[i] = checkpoint_wrapper(block)
            n += 1
    return n


def compile_blocks(model: JEPAT, backend: str) -> list[nn.Module]:
    """``torch.compile`` every encoder and predictor block and the flow head in place (their
    ``forward`` is replaced; the module tree and state-dict keys are unchanged). Returns the parts."""
    parts = [*model.encoder_blocks, *model.predictor_blocks, model.flow_head]
    for part in parts:
        part.forward = torch.compile(part.forward, backend=backend, fullgraph=True)
    return parts


def compile_report(parts: list[nn.Module]) -> dict[str, Any]:
    """What dynamo made of the compiled ``parts`` so far in this process: graphs held per compiled
    code object (blocks of one class share theirs), recompiles (graphs beyond the first of each)
    and graph breaks (none can happen inside a part: they are compiled with ``fullgraph``)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    from torch._dynamo.utils import counters

    codes = {type(p).forward.__code__ for p in parts}
    graphs = {code.co_qualname: len(_debug_get_cache_entry_list(code)) for code in codes}
    return {
        "graphs": graphs,
        "recompiles": sum(max(0, n - 1) for n in graphs.values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def clean_fqn(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")


def _state_dicts():
    """torch.distributed.checkpoint's state-dict helpers, imported where FSDP needs them (they
    and FSDP2 take about a second to import, which plain and DDP processes need not pay)."""
    from torch.distributed.checkpoint import state_dict

    return state_dict


def _shard_jepat(model: JEPAT, mesh, mp_policy) -> None:
    """FSDP2 units: each transformer block, the flow head, the JEPA head (the root takes the rest)."""
    from torch.distributed.fsdp import fully_shard

    for blocks in (model.encoder_blocks, model.predictor_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model.flow_head, mesh=mesh, mp_policy=mp_policy)
    fully_shard(model.jepa_head, mesh=mesh, mp_policy=mp_policy)


class Parallel:
    """Owns how the step runs in this process. ``model`` and ``ema`` stay the JEPAT objects the
    caller built (under FSDP their parameters become shards).

    Attributes:
        train_module: callable(x, text, host_generator) -> losses; every strategy, one process included.
        scaler: a GradScaler for fp16, else None.
    """

    def __init__(
        self,
        env: DistEnv,
        model: JEPAT,
        ema: JEPAT,
        loss: JEPATLoss,
        strategy: str = "ddp",
        precision: str = "fp32",
        grad_checkpointing: bool = False,
        compile_backend: str | None = None,
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; choose one of {STRATEGIES}")
        self.env, self.model, self.ema = env, model, ema
        self.strategy = strategy if env.initialized else "single"
        if strategy == "fsdp" and not env.initialized:
            log.warning("--strategy fsdp needs torchrun; running as a single process")
        self.compiled: list[nn.Module] = compile_blocks(model, compile_backend) if compile_backend else []
        if compile_backend:
            log.info("torch.compile (%s) on %d blocks", compile_backend, len(self.compiled))
        if grad_checkpointing:
            log.info("activation checkpointing on %d blocks", apply_activation_checkpointing(model))
        self.scaler = torch.amp.GradScaler(env.device.type) if precision == "fp16" else None
        self._ddp: DistributedDataParallel | None = None
        self._fsdp_root: TrainingStep | None = None
        if self.strategy == "fsdp":
            module: nn.Module = self._fsdp(loss, precision)
        else:
            module = TrainingStep(model, loss, EMATarget(ema))
            if self.strategy == "ddp":
                ids = [env.device.index] if env.device.type == "cuda" else None
                # a loss weight of 0 leaves a head unused, which needs the slower search (the parts a
                # fusion mode leaves unused are frozen by the model itself)
                unused = loss.flow_weight == 0 or loss.jepa_weight == 0
                module = self._ddp = DistributedDataParallel(
                    module, device_ids=ids, find_unused_parameters=unused, gradient_as_bucket_view=True
                )
        self.train_module = module

    def _fsdp(self, loss: JEPATLoss, precision: str) -> TrainingStep:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(self.env.device.type, (self.env.world_size,))
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
        # parameters are gathered in the compute dtype, gradients reduced in fp32; inputs stay
        # as they are (the flow targets must not be rounded to bf16)
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
        # the root's own parameters (position tables, input projections, text fusion) stay float32 as
        # under DDP, so the residual stream is float32 under both: bf16 linears add into a float32
        # stream, as autocast does with DDP's float32 weights (tests/test_distributed.py checks it)
        root_mp = MixedPrecisionPolicy(reduce_dtype=torch.float32, cast_forward_inputs=False)
        _shard_jepat(self.model, mesh, mp)
        root = TrainingStep(self.model, loss, None)
        fully_shard(root, mesh=mesh, mp_policy=root_mp)
        _shard_jepat(self.ema, mesh, mp)
        target = EMATarget(self.ema)
        fully_shard(target, mesh=mesh, mp_policy=root_mp, reshard_after_forward=True)
        root._target = (target,)
        self._fsdp_root = root
        return root

    # ------------------------------------------------------------ the step
    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, through the GradScaler under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def grad_sync(self, sync: bool) -> AbstractContextManager:
        """No gradient all-reduce / reduce-scatter on the inner micro-steps of an accumulation."""
        if self._ddp is not None and not sync:
            return self._ddp.no_sync()
        if self._fsdp_root is not None:
            self._fsdp_root.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()

    def reduce_sum_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum over ranks (the log-interval metrics); the identity in one process."""
        if self.env.initialized:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    # ------------------------------------------------------------ state
    @staticmethod
    def _options():
        return _state_dicts().StateDictOptions(full_state_dict=True, cpu_offload=True)

    def _full_state(self, module: nn.Module) -> dict[str, torch.Tensor] | None:
        if self.strategy != "fsdp":
            return module.state_dict()
        sd = _state_dicts().get_model_state_dict(module, options=self._options())  # a collective: every rank calls it
        return {clean_fqn(k): v for k, v in sd.items()} if self.env.is_main else None

    def model_state(self) -> dict[str, torch.Tensor] | None:
        """The full model state dict on rank 0 (None on the others under FSDP, which gathers shards)."""
        return self._full_state(self.model)

    def ema_state(self) -> dict[str, torch.Tensor] | None:
        return self._full_state(self.ema)

    def _param_names(self, optimizer: torch.optim.Optimizer) -> list[str]:
        """Clean FQNs in the optimizer's own order (the ids of a plain optimizer state dict)."""
        names = {id(p): clean_fqn(n) for n, p in self.model.named_parameters()}
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The optimizer state in the plain (integer-id) format on rank 0, whatever the strategy,
        so that DDP and FSDP checkpoints resume each other."""
        if self.strategy != "fsdp":
            return optimizer.state_dict()
        osd = _state_dicts().get_optimizer_state_dict(self.model, optimizer, options=self._options())
        if not self.env.is_main:
            return None
        index = {n: i for i, n in enumerate(self._param_names(optimizer))}
        state = {index[clean_fqn(k)]: v for k, v in osd["state"].items()}
        groups = [{**g, "params": [index[clean_fqn(k)] for k in g["params"]]} for g in osd["param_groups"]]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
        """Load a plain optimizer state dict (every rank passes the full one)."""
        if self.strategy != "fsdp":
            optimizer.load_state_dict(state)
            return
        names = self._param_names(optimizer)
        fqn = {
            "state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]],
        }
        _state_dicts().set_optimizer_state_dict(self.model, optimizer, fqn, options=self._options())

    def sampling_ema(self) -> JEPAT:
        """The EMA to sample from on this rank: the EMA itself (one process, DDP), or under FSDP a
        consolidated copy on every rank (a collective), so that every rank generates its share."""
        if self.strategy != "fsdp":
            return self.ema
        dicts = _state_dicts()
        sd = dicts.get_model_state_dict(self.ema, options=dicts.StateDictOptions(full_state_dict=True))  # every rank
        with torch.device("meta"):  # no second copy: the gathered tensors become the model's
            plain = JEPAT(copy.deepcopy(self.model.cfg))
        plain.load_state_dict({clean_fqn(k): v for k, v in sd.items()}, assign=True)
        return plain.requires_grad_(False).eval()

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
            raise RuntimeError(
                "model or EMA replicas differ between ranks; every rank must run the same "
                "arguments and code (a rank-dependent branch would cause this)"
            )


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if hasattr(p, "to_local") else p


def grad_norm_value(norm: torch.Tensor) -> float:
    """clip_grad_norm_'s result as a float (a DTensor under FSDP)."""
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
