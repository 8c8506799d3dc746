"""The checkpoint policy of a long run: checkpoint-last.pth always, epoch checkpoints kept by a
policy (the newest k plus milestones), each state written once, and a preflight that refuses to
start when the folder cannot hold what the policy will keep."""

import os
import shutil
from collections import namedtuple

import pytest

from tests.test_train import run_main
from util.config import resolve
from util.errors import UserError
from util.training.checkpoint import CheckpointPolicy
from util.training.preflight import preflight


def test_the_policy_keeps_the_newest_and_the_milestones():
    p = CheckpointPolicy(save_freq=10, keep_last=2, milestone_every=100)
    assert [e for e in range(1, 41) if p.saves(e)] == [10, 20, 30, 40]
    assert p.removable([10, 20, 30, 40, 100]) == [10, 20]  # 100 is a milestone, 30 and 40 the newest
    # the published base recipe over its 1400 epochs: last + 2 newest + 14 milestones + one being written
    c = resolve(["imagenet-base"]).runtime
    files = CheckpointPolicy(c.save_freq, c.keep_last, c.milestone_every).peak_files(1400)
    assert files == {"last": 1, "recent": 2, "milestones": 14, "being written": 1}
    assert CheckpointPolicy(save_freq=1).peak_files(3) == {"last": 1, "recent": 3, "milestones": 0, "being written": 1}


def test_a_run_keeps_what_the_policy_says_and_writes_each_state_once(tmp_path):
    (tmp_path / "checkpoint-9.pth").write_bytes(b"")  # a later epoch of an earlier attempt: not ours to remove
    run_main(
        tmp_path,
        "--epochs",
        "6",
        "--num_samples",
        "16",
        "--save_freq",
        "1",
        "--keep_last",
        "2",
        "--milestone_every",
        "4",
    )
    names = sorted(p.name for p in tmp_path.glob("checkpoint-*.pth"))
    assert names == "checkpoint-4.pth checkpoint-5.pth checkpoint-6.pth checkpoint-9.pth checkpoint-last.pth".split()
    last, six = os.stat(tmp_path / "checkpoint-last.pth"), os.stat(tmp_path / "checkpoint-6.pth")
    assert (last.st_ino, last.st_dev) == (six.st_ino, six.st_dev)  # one file under two names


def test_preflight_refuses_a_folder_that_cannot_hold_the_policy(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 0, 10 * 2**30))
    files = {"last": 1, "recent": 2, "milestones": 14, "being written": 1}
    with pytest.raises(
        UserError,
        match=r"10.00 GiB free .* needs 18 checkpoints of 3.00 GiB \(last 1, recent 2, "
        r"milestones 14, being written 1\) = 54.00 GiB",
    ):
        preflight(tmp_path / "run", 3 * 2**30, None, files)
    preflight(tmp_path / "run", 3 * 2**30, None, {"last": 1, "being written": 1})  # 6 GiB fit
