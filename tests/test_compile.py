"""torch.compile that holds: blocks compiled on their own, before activation checkpointing and the
distributed wrappers, keep at most two graphs each over steps whose masking differs."""

import copy

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from models.loss import JEPATLoss
from tests.helpers import SEQ_LEN, TOKEN_DIM, random_text, tiny_model
from util.runtime import DistEnv
from util.training.parallel import Parallel, compile_report, seed_step


def test_compiled_blocks_hold_over_twenty_steps_of_varying_masks():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = tiny_model()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    p = Parallel(
        DistEnv(), model, ema, JEPATLoss(), "ddp", "fp32", grad_checkpointing=True, compile_backend="aot_eager"
    )
    # compiled inside the checkpoint wrapper: the wrapper (and DDP / FSDP hooks) stay outside the graphs
    assert isinstance(model.encoder_blocks[0], CheckpointWrapper)
    assert hasattr(model.encoder_blocks[0]._checkpoint_wrapped_module.forward, "_torchdynamo_orig_callable")
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    host = torch.Generator()
    ratios = set()
    for step in range(20):
        seed_step(1234, step, 0, host)
        x = torch.randn(4, SEQ_LEN, TOKEN_DIM)
        out = p.train_module(x, random_text(4, seed=step), host)
        p.backward(out["loss"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ratios.add(float(out["mask_ratio"]))
    assert len(ratios) >= 5  # the number of hidden tokens really changed from step to step
    report = compile_report(p.compiled)
    assert report["graph_breaks"] == 0, report
    assert report["recompiles"] <= 2, report
    assert len(report["graphs"]) == 2 and all(n >= 1 for n in report["graphs"].values()), report  # blocks, flow head
