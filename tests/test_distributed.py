"""Distributed training on the CPU: two gloo processes (forked from a preloaded fork server, with
the environment torchrun would give them) against one process with the same global batch; exact
resume after a preemption signal; FSDP2; accumulation against a larger batch; compile without
``_orig_mod.`` keys."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import main_jepat
from tests.helpers import fork_server, in_environ

# 16 px shapes, 8 px patches (4 tokens); 48 images = 6 steps of a global batch of 8 per epoch, read
# from a latent cache that holds flipped images too, through 2 loader workers per process: every
# run here draws a random flip per item, which must follow (seed, epoch, item) whatever the ranks,
# workers and resumes (the cache's path is added by the module's fixture below)
COMMON = (
    "--img_size 16 --patch_size 8 --num_samples 48 --lr 1e-3 --warmup_epochs 0.5 --log_freq 3 "
    "--no_eval --grid_freq 0 --num_workers 2 --precision fp32 --device cpu --weight_decay_end "
    "0.1 --ema_rate_start 0.9 --ema_rate 0.99 --epochs 4 --text_max_length 8 --dataset cached --random_flip"
).split()
STEPS = 4 * 6  # the uninterrupted runs: 4 epochs of 6 steps (the resumed runs here stop at 12)


def write_flipped_cache(tmp_path_factory) -> Path:
    """48 shapes images cached with their flips and their captions' embeddings (a caption table:
    the ranks gather rows in their loader workers and never build the text encoder)."""
    import main_cache

    cache = tmp_path_factory.mktemp("flipped") / "cache"
    argv = "--dataset shapes --img_size 16 --num_samples 48 --random_flip --text_max_length 8 --device cpu".split()
    main_cache.main(main_cache.get_args_parser().parse_args(argv + ["--cache_dir", str(cache)]))
    return cache


@pytest.fixture(scope="module", autouse=True)
def flipped_cache(tmp_path_factory) -> Path:
    """Every run of this module trains from the flipped cache."""
    cache = write_flipped_cache(tmp_path_factory)
    COMMON.extend(["--data_path", str(cache)])
    yield cache
    del COMMON[-2:]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, argv: list[str], log: str) -> None:
    """One rank, with the environment torchrun sets (env:// rendezvous); its stdout and stderr go
    to ``log`` (a forked rank would otherwise write to the fork server's, not to this test's)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(1)
    # the rank's loader workers fork, as those of a torchrun worker do
    mp.set_start_method("fork", force=True)
    main_jepat.main(main_jepat.get_args_parser().parse_args(argv))


def rank_logs(argv: list[str], world: int = 2) -> list[Path]:
    """Where the ranks of a run with ``argv`` write their output: beside its run folder."""
    out = Path(argv[argv.index("--output_dir") + 1])
    return [out.parent / f"{out.name}-rank{r}.log" for r in range(world)]


def start_ranks(argv: list[str], world: int = 2) -> list[mp.Process]:
    """Two ranks, forked by a fork server that imported the training code once: clean processes like
    spawned ones, without each importing torch, dynamo (the optimizer's) and matplotlib again."""
    ctx = fork_server()
    port = _free_port()
    logs = rank_logs(argv, world)
    env = dict(os.environ)
    procs = [
        ctx.Process(target=in_environ, args=(r, env, _rank_main, world, port, argv, str(logs[r]))) for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def join_ranks(procs: list[mp.Process], timeout: float = 240) -> list[int]:
    deadline = time.time() + timeout
    for p in procs:
        p.join(max(1.0, deadline - time.time()))
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    return codes


def run_ranks(argv: list[str], world: int = 2) -> None:
    codes = join_ranks(start_ranks(argv, world))
    tails = "\n".join(f"--- {f.name}\n{f.read_text()[-2000:]}" for f in rank_logs(argv, world) if f.is_file())
    assert codes == [0] * world, f"ranks exited with {codes}\n{tails}"


def run_single(out: Path, *extra: str) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # like each rank; a shared, busy machine punishes spinning intra-op threads
    try:
        return main_jepat.main(
            main_jepat.get_args_parser().parse_args(COMMON + ["--output_dir", str(out)] + list(extra))
        )
    finally:
        torch.set_num_threads(threads)


def load(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def assert_same(a: dict, b: dict, exact: bool) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            if exact:
                assert torch.equal(a[key][k], b[key][k]), (key, k)
            else:  # float summation order differs; Adam turns the ~0 gradient of key biases into noise
                torch.testing.assert_close(a[key][k], b[key][k], rtol=1e-4, atol=5e-5, msg=f"{key}.{k}")
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in ("exp_avg", "exp_avg_sq"):
            if exact:
                assert torch.equal(sa[i][k], sb[i][k]), (i, k)
            else:
                torch.testing.assert_close(sa[i][k], sb[i][k], rtol=1e-3, atol=1e-6)


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two gloo ranks, batch 4 each, uninterrupted: checkpoint-1.pth after 6 steps, -last after 24."""
    out = tmp_path_factory.mktemp("ddp")
    run_ranks(COMMON + ["--batch_size", "4", "--output_dir", str(out)])
    return out


def test_two_gloo_ranks_match_one_process_with_the_same_global_batch(ddp_run, tmp_path):
    one = tmp_path / "one"
    run_single(one, "--batch_size", "4", "--accum_iter", "2", "--max_steps", "6")
    a, b = load(ddp_run / "checkpoint-1.pth"), load(one / "checkpoint-last.pth")
    assert a["state"]["step"] == b["state"]["step"] == 6
    assert (
        a["config"]["optim"]["batch_size"] * 2
        == b["config"]["optim"]["batch_size"] * b["config"]["optim"]["accum_iter"]
    )
    assert_same(a, b, exact=False)
    # the same losses and gradient norms were logged (rank 0 logs the mean over ranks)
    log_a = json.loads((ddp_run / "train_log.json").read_text())
    log_b = json.loads((one / "train_log.json").read_text())
    for ra, rb in zip(log_a, log_b):
        assert ra["step"] == rb["step"]
        for k in ("loss", "flow_loss", "jepa_loss", "grad_norm"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-4), (ra["step"], k)
    # and the weights moved: the comparison is not between two untouched models
    first = load(ddp_run / "checkpoint-last.pth")
    assert not torch.allclose(first["model"]["z_proj.weight"], a["model"]["z_proj.weight"])
    assert not any(k.startswith(("module.", "_orig_mod.", "model.")) for k in a["model"])


def test_preemption_signal_on_one_rank_saves_and_the_resumed_run_is_bitwise_identical(ddp_run, tmp_path, caplog):
    """The resumed runs stop at step 12, two epochs in (the schedules still span four), and are
    compared with the uninterrupted run's checkpoint of that step."""
    out = tmp_path / "pre"
    argv = COMMON + ["--batch_size", "4", "--output_dir", str(out), "--save_every_steps", "1"]
    procs = start_ranks(argv)
    deadline = time.time() + 180
    while not (out / "checkpoint-last.pth").exists() and time.time() < deadline and all(p.is_alive() for p in procs):
        time.sleep(0.05)
    os.kill(procs[1].pid, signal.SIGUSR1)  # only rank 1 is told; both must stop at the same step
    assert join_ranks(procs) == [0, 0]
    stopped = load(out / "checkpoint-last.pth")
    assert 0 < stopped["state"]["step"] < 12
    shutil.copy(out / "checkpoint-last.pth", tmp_path / "stopped.pth")
    run_ranks(argv + ["--resume", "auto", "--max_steps", "12"])  # rank 0 finds checkpoint-last.pth, every rank follows
    resumed = load(out / "checkpoint-last.pth")
    assert resumed["state"]["step"] == 12
    uninterrupted = load(ddp_run / "checkpoint-2.pth")
    assert uninterrupted["state"]["step"] == 12
    assert_same(uninterrupted, resumed, exact=True)
    # the same checkpoint of two ranks, resumed by one process with the same global batch (4 x 2 micro-batches)
    with caplog.at_level(logging.INFO, logger="util.training.checkpoint"):
        run_single(
            tmp_path / "one",
            *("--batch_size", "4", "--accum_iter", "2", "--max_steps", "12"),
            *("--resume", str(tmp_path / "stopped.pth")),
        )
    assert "written by 2 process(es) x batch 4 x accum 1, this run is 1 x 4 x 2: continuing at sample" in caplog.text
    one = load(tmp_path / "one" / "checkpoint-last.pth")
    assert one["state"]["step"] == 12 and one["state"]["world_size"] == 1
    assert_same(uninterrupted, one, exact=False)


def test_one_process_resumes_on_two_fsdp_ranks_from_the_same_sample_and_matches_ddp(ddp_run, tmp_path):
    """Another world size (1 -> 2) and another strategy (one process -> FSDP2 with activation
    checkpointing) in one resume, from the middle of an epoch. The FSDP ranks write sharded
    checkpoints (each its own shards, nothing gathered), resume from one, and the offline
    conversion gives the plain file every tool reads."""
    from util.training.checkpoint import convert_sharded as convert
    from util.training.checkpoint import load_checkpoint
    from util.training.sharded import is_sharded

    out = tmp_path / "fsdp"
    run_single(out, "--batch_size", "4", "--accum_iter", "2", "--max_steps", "3")  # 24 of the epoch's 48 samples
    assert load(out / "checkpoint-last.pth")["state"]["batch_in_epoch"] == 6
    argv = COMMON + ["--batch_size", "4", "--output_dir", str(out), "--strategy", "fsdp", "--grad_checkpointing"]
    # resumed (the full optimizer state is sharded) up to the DDP run's first checkpoint
    run_ranks(argv + ["--max_steps", "6", "--resume", str(out / "checkpoint-last.pth")])
    assert is_sharded(out / "checkpoint-last.dcp") and is_sharded(out / "checkpoint-1.dcp")
    a, b = load(ddp_run / "checkpoint-1.pth"), load_checkpoint(out / "checkpoint-last.dcp")
    assert b["state"]["step"] == 6 and b["state"]["epoch"] == 1 and b["state"]["world_size"] == 2
    assert all(type(v) is torch.Tensor for v in b["model"].values())  # full tensors, not shards
    assert_same(a, b, exact=False)
    # the ranks resume from their shards (--resume auto finds the folder) for another epoch
    log = rank_logs(argv)[0]
    log.unlink()
    run_ranks(argv + ["--resume", "auto", "--max_steps", "12"])
    assert f"resumed {out / 'checkpoint-last.dcp'} at epoch 1, batch 0, step 6" in log.read_text()
    converted = convert(out / "checkpoint-last.dcp", tmp_path / "plain.pth")
    final = load(converted)
    assert final["state"]["step"] == 12
    assert_same(load(ddp_run / "checkpoint-2.pth"), final, exact=False)
    # the converted checkpoint samples without any distributed setup
    import main_sample

    rows = main_sample.main(
        main_sample.get_args_parser().parse_args(
            [
                "--checkpoint",
                str(converted),
                "--prompt",
                "a red circle",
                "--num_per_prompt",
                "1",
                "--out_dir",
                str(tmp_path / "samples"),
                *"--num_iter 2 --ode_steps 2 --device cpu".split(),
            ]
        )
    )
    assert len(rows) == 1


@pytest.mark.parametrize("preset", ["base", "large", "huge"])
def test_recipe_scripts_launch_torchrun_with_flags_main_jepat_accepts(preset, tmp_path):
    """Run scripts/jepat_<preset>.sh with a stand-in venv whose `torchrun` records its arguments."""
    import hashlib
    import subprocess
    import sys

    root = Path(main_jepat.__file__).resolve().parent
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / ".requirements.sha").write_text(hashlib.sha256((root / "requirements.txt").read_bytes()).hexdigest() + "\n")
    record = tmp_path / "argv.txt"
    (venv / "bin" / "torchrun").write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    (venv / "bin" / "torchrun").chmod(0o755)
    (venv / "bin" / "activate").write_text(f'export PATH="{venv / "bin"}:$PATH"\n')
    env = {
        **os.environ,
        "JEPAT_VENV": str(venv),
        "GPUS_PER_NODE": "8",
        "NNODES": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "node0",
        "OUTPUT_DIR": str(tmp_path / "run"),
    }
    out = subprocess.run(
        ["bash", str(root / "scripts" / f"jepat_{preset}.sh")], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    argv = record.read_text().splitlines()
    launcher, args = argv[: argv.index("main_jepat.py")], argv[argv.index("main_jepat.py") + 1 :]
    assert launcher[launcher.index("--nnodes") + 1] == "4" and launcher[launcher.index("--node_rank") + 1] == "1"
    assert launcher[launcher.index("--master_addr") + 1] == "node0"
    # the script passes the recipe and the cluster's values only; the recipe holds everything else
    assert args[:2] == ["--config", f"imagenet-{preset}"]
    assert {a for a in args if a.startswith("--")} <= {
        "--config",
        "--device",
        "--data_path",
        "--vae_path",
        "--text_encoder_path",
        "--batch_size",
        "--accum_iter",
        "--output_dir",
        "--resume",
    }
    c = main_jepat.parse_args(args).config
    global_batch = c.optim.batch_size * c.optim.accum_iter * 32
    assert global_batch == 2048 and c.model.preset == preset and c.optim.blr == 1e-4 and c.runtime.precision == "bf16"
    assert c.data.dataset == "cached" and c.model.tokenizer == "kl16" and c.loss.jepa_beta == 2.0
    # the published flow head: velocity output, uniform flow times (the CPU recipe differs)
    assert c.model.flow_prediction == "v" and c.model.t_logit_mean is None
    assert (c.runtime.strategy == "fsdp") == (preset == "huge") and c.runtime.grad_checkpointing and c.runtime.compile


def test_a_run_folder_that_a_rank_cannot_see_stops_the_run_at_start_up(tmp_path):
    from util.errors import UserError
    from util.training.preflight import check_shared_folder

    class OtherNode:  # rank 1 of 2, on a node where rank 0's folder is not mounted
        rank, world_size, is_main = 1, 2, False

        def from_rank0(self, value):
            return "0123abcd"  # rank 0's token, written on its own disk

        def barrier(self):
            pass

        def all_ranks(self, flag):
            return flag

    with pytest.raises(UserError, match="not shared by all ranks .*rank 1 does not see"):
        check_shared_folder(tmp_path / "run", OtherNode())


def test_ddp_and_fsdp_train_with_one_residual_dtype():
    """bf16 autocast: the residual stream entering the blocks and the flow head is float32 under DDP
    (float32 weights) and under FSDP2 (bf16 block gathers, float32 root); the first step's losses agree."""
    import copy

    import torch.distributed as dist

    from models.loss import JEPATLoss
    from tests.helpers import SEQ_LEN, TOKEN_DIM, random_text, tiny_model
    from util.runtime import DistEnv, autocast_context
    from util.training.parallel import Parallel, seed_step

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        env, result = DistEnv(rank=0, world_size=1, initialized=True), {}
        for strategy in ("ddp", "fsdp"):
            model, seen = tiny_model(), {}
            parts = {
                "encoder": model.encoder_blocks[0],
                "predictor": model.predictor_blocks[0],
                "flow": model.flow_head,
            }
            for name, part in parts.items():
                part.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, a[0].dtype) and None)
            p = Parallel(env, model, copy.deepcopy(model).requires_grad_(False), JEPATLoss(), strategy, "bf16")
            host = torch.Generator()
            seed_step(0, 0, 0, host)
            with autocast_context(torch.device("cpu"), "bf16"):
                out = p.train_module(torch.randn(4, SEQ_LEN, TOKEN_DIM), random_text(4), host)
            p.backward(out["loss"])
            result[strategy] = (seen, float(out["loss"]))
    finally:
        dist.destroy_process_group()
    (ddp_dtypes, ddp_loss), (fsdp_dtypes, fsdp_loss) = result["ddp"], result["fsdp"]
    assert ddp_dtypes == fsdp_dtypes == {k: torch.float32 for k in ("encoder", "predictor", "flow")}
    assert fsdp_loss == pytest.approx(ddp_loss, rel=1e-3)


def _write_variable(rank: int, name: str, path: str) -> None:
    Path(path).write_text(os.environ.get(name, "<unset>"))


def test_ranks_from_the_fork_server_see_the_environment_of_the_test_that_starts_them(tmp_path, monkeypatch):
    """The server is started before the variable is set (as by an earlier test in this worker);
    a rank started through in_environ still sees it, as a spawned rank would."""
    ctx = fork_server()
    early = ctx.Process(target=_write_variable, args=(0, "JEPAT_TEST_VARIABLE", str(tmp_path / "early")))
    early.start()
    early.join(60)
    monkeypatch.setenv("JEPAT_TEST_VARIABLE", "set after the server started")
    args = (0, dict(os.environ), _write_variable, "JEPAT_TEST_VARIABLE", str(tmp_path / "rank"))
    rank = ctx.Process(target=in_environ, args=args)
    rank.start()
    rank.join(60)
    assert early.exitcode == 0 and rank.exitcode == 0
    assert (tmp_path / "rank").read_text() == "set after the server started"
