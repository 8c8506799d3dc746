"""One process, from the flipped latent cache of tests/test_distributed.py: gradient accumulation
against a larger batch, and a compiled run whose checkpoints carry no ``_orig_mod.`` keys. (A file
of their own so that the suite's two workers share the distributed tests.)"""

from __future__ import annotations

import json

import pytest

from tests.test_distributed import COMMON, assert_same, load, run_single, write_flipped_cache


@pytest.fixture(scope="module", autouse=True)
def flipped_cache(tmp_path_factory):
    cache = write_flipped_cache(tmp_path_factory)
    COMMON.extend(["--data_path", str(cache)])
    yield cache
    del COMMON[-2:]


def test_accumulation_equals_a_larger_batch(tmp_path):
    # a loss without random draws: every token hidden (mask ratio 1), no CFG dropout, JEPA loss only
    det = ["--mask_ratio_min", "1.0", "--cond_drop_prob", "0", "--flow_weight", "0", "--max_steps", "4"]
    run_single(tmp_path / "big", "--batch_size", "8", *det)
    run_single(tmp_path / "acc", "--batch_size", "4", "--accum_iter", "2", *det)
    big, acc = load(tmp_path / "big" / "checkpoint-last.pth"), load(tmp_path / "acc" / "checkpoint-last.pth")
    assert big["state"]["step"] == acc["state"]["step"] == 4 and acc["state"]["batch_in_epoch"] == 8
    assert_same(big, acc, exact=False)
    # Adam hides a gradient scale; the logged (pre-clip) gradient norm does not
    log_big = json.loads((tmp_path / "big" / "train_log.json").read_text())
    log_acc = json.loads((tmp_path / "acc" / "train_log.json").read_text())
    assert [r["step"] for r in log_big] == [r["step"] for r in log_acc] == [3, 4]
    for a, b in zip(log_big, log_acc):
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)


def test_compiled_training_saves_plain_keys(tmp_path):
    run_single(
        tmp_path,
        "--batch_size",
        "8",
        "--num_workers",
        "0",
        "--compile",
        "--compile_backend",
        "eager",
        "--max_steps",
        "2",
    )
    ckpt = load(tmp_path / "checkpoint-last.pth")
    assert ckpt["state"]["step"] == 2
    assert not any("_orig_mod" in k for key in ("model", "ema") for k in ckpt[key])
    run_single(
        tmp_path,
        "--num_workers",
        "0",
        "--batch_size",
        "8",
        "--compile",
        "--compile_backend",
        "eager",
        "--max_steps",
        "3",
        "--resume",
        str(tmp_path / "checkpoint-last.pth"),
    )
    assert load(tmp_path / "checkpoint-last.pth")["state"]["step"] == 3
