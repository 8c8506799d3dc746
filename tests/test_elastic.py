"""torchrun as a cluster runs it, rehearsed on the CPU: two agents (two "nodes", c10d rendezvous on
127.0.0.1), and an elastic restart after a worker is killed without warning. The runs train from
the same flipped latent cache and arguments as tests/test_distributed.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import main_jepat
from tests.test_distributed import COMMON, STEPS, _free_port, assert_same, load, write_flipped_cache

ROOT = Path(main_jepat.__file__).resolve().parent


STOP = STEPS // 2  # both runs stop after two of the four epochs (the schedules span all four)


@pytest.fixture(scope="module")
def argv(tmp_path_factory) -> list[str]:
    cache = write_flipped_cache(tmp_path_factory)
    return COMMON + ["--data_path", str(cache), "--batch_size", "4", "--max_steps", str(STOP)]


def torchrun(*launch: str, argv: list[str], log: Path) -> subprocess.Popen:
    """``torchrun <launch> main_jepat.py <argv>``, one thread per worker (the same summation order
    in every run, so the same bits)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "main_jepat.py", *argv]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        code = "timeout"
    assert code == 0, f"torchrun exited with {code}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def two_nodes(argv, tmp_path_factory) -> dict:
    """Two agents, --nnodes 2, one process each, c10d rendezvous on 127.0.0.1: the finished run."""
    out = tmp_path_factory.mktemp("two_nodes")
    port = _free_port()
    launch = ("--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d",
              "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "jepat-test")  # fmt: skip
    agents = [
        torchrun(*launch, argv=argv + ["--output_dir", str(out / "run")], log=out / f"agent{i}.log") for i in range(2)
    ]
    for i, agent in enumerate(agents):
        finish(agent, out / f"agent{i}.log")
    ckpt = load(out / "run" / "checkpoint-last.pth")
    assert ckpt["state"]["step"] == STOP and ckpt["state"]["world_size"] == 2
    return ckpt


def _workers_of(pid: int) -> list[int]:
    """The agent's worker processes: its children that run main_jepat.py (from /proc; their own
    children, the loader workers, are left out)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == pid and b"main_jepat.py" in (stat.parent / "cmdline").read_bytes():
                found.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(found)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
def test_a_killed_rank_restarts_the_group_which_resumes_and_matches_two_agents(argv, two_nodes, tmp_path):
    """One agent, two processes, --max_restarts 1 and --resume auto: a worker killed with SIGKILL
    (no chance to save) makes the agent restart the group, which resumes from checkpoint-last.pth
    by itself and ends, bit for bit, where the uninterrupted two-agent (two-node) run ended."""
    out = tmp_path / "run"
    log = tmp_path / "agent.log"
    run_argv = argv + ["--output_dir", str(out), "--save_every_steps", "1", "--resume", "auto"]
    agent = torchrun("--standalone", "--nproc_per_node", "2", "--max_restarts", "1", argv=run_argv, log=log)
    deadline, seen = time.time() + 180, None
    last = out / "checkpoint-last.pth"
    while time.time() < deadline and agent.poll() is None:
        st = last.stat() if last.exists() else None
        stamp = st and (st.st_ino, st.st_mtime_ns)  # each save replaces the file: a new inode
        if stamp != seen:  # read each new checkpoint once, not 20 times a second beside the ranks
            seen = stamp
            if stamp is not None and 2 <= load(last)["state"]["step"] < STOP - 4:
                break
        time.sleep(0.05)
    workers = _workers_of(agent.pid)
    assert agent.poll() is None and len(workers) == 2, log.read_text()[-3000:]
    os.kill(workers[-1], signal.SIGKILL)
    finish(agent, log)
    assert "resumed" in log.read_text(), log.read_text()[-3000:]  # the first attempt started afresh
    final = load(out / "checkpoint-last.pth")
    assert final["state"]["step"] == STOP
    assert_same(two_nodes, final, exact=True)
