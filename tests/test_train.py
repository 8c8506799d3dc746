import importlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

import engine_jepat
import main_jepat
from models.safe_load import CheckpointFileError
from tests.helpers import tiny_model
from util.data import shapes
from util.data.datasets import DataOrder
from util.errors import UserError
from util.training.checkpoint import load_checkpoint, save_checkpoint
from util.training.schedules import CosineValue, LRSchedule, WeightDecaySchedule

ROOT = Path(__file__).resolve().parents[1]

# a run small enough for the CPU: 16 px shapes, 8 px patches (4 tokens), tiny preset
SMALL = (
    "--img_size 16 --patch_size 8 --num_samples 96 --batch_size 8 --lr 1e-3 --warmup_epochs "
    "0.5 --log_freq 2 --no_eval --num_workers 0 --precision fp32 --device cpu "
    "--weight_decay_end 0.1 --ema_rate_start 0.9 --ema_rate 0.99 --lr_schedule cosine"
).split()


def run_main(tmp_path: Path, *extra: str) -> dict:
    args = main_jepat.get_args_parser().parse_args(SMALL + ["--output_dir", str(tmp_path)] + list(extra))
    return main_jepat.main(args)


def test_checkpoint_round_trip_is_bit_identical(tmp_path):
    model = tiny_model()
    state = {"model": model.state_dict(), "ema": model.state_dict(), "model_config": {"preset": "tiny"}}
    save_checkpoint(tmp_path / "a.pth", state)
    loaded = load_checkpoint(tmp_path / "a.pth")
    fresh = tiny_model(seed=1)
    fresh.load_state_dict(loaded["model"])
    for (k, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    assert not list(tmp_path.glob(".*tmp"))  # the temp file was renamed away
    with pytest.raises(ValueError, match="'base'.*'tiny'|tiny.*base"):
        load_checkpoint(tmp_path / "a.pth", expect_preset="base")
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        load_checkpoint(tmp_path / "missing.pth")


def test_compiled_and_ddp_prefixes_are_stripped(tmp_path):
    model = tiny_model()
    prefixed = {f"_orig_mod.{k}": v for k, v in model.state_dict().items()}
    save_checkpoint(tmp_path / "c.pth", {"model": prefixed, "model_config": {"preset": "tiny"}})
    tiny_model(seed=2).load_state_dict(load_checkpoint(tmp_path / "c.pth")["model"])


def test_resumed_run_continues_exactly(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    run_main(full, "--epochs", "2")  # 24 steps uninterrupted
    run_main(part, "--epochs", "2", "--max_steps", "7")  # stopped mid-epoch ...
    run_main(part, "--epochs", "2", "--resume", str(part / "checkpoint-last.pth"))  # ... and resumed
    a = torch.load(full / "checkpoint-last.pth", weights_only=True)
    b = torch.load(part / "checkpoint-last.pth", weights_only=True)
    assert a["state"]["step"] == b["state"]["step"] == 24
    for key in ("model", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)
    log = json.loads((full / "train_log.json").read_text())
    # throughput in every row: images/s, FLOP/s counted once by torch.utils.flop_counter, share of the peak
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and 0 < r["mfu"] < 1 for r in log), log[0]
    # the logged schedule values are the applied ones and they move
    assert log[0]["weight_decay"] != log[-1]["weight_decay"] and log[0]["ema_momentum"] != log[-1]["ema_momentum"]
    run = json.loads((full / "run.json").read_text())
    assert run["model_config"]["preset"] == "tiny" and run["total_steps"] == 24
    assert "optim:" in (full / "config.yaml").read_text()


def test_short_training_on_shapes_lowers_the_loss(tmp_path):
    run_main(tmp_path, "--epochs", "3")
    log = json.loads((tmp_path / "train_log.json").read_text())
    first = sum(r["flow_loss"] for r in log[:3]) / 3
    last = sum(r["flow_loss"] for r in log[-3:]) / 3
    assert last < 0.8 * first, (first, last)


def test_checkpoint_of_another_preset_is_refused(tmp_path, monkeypatch):
    run_main(tmp_path, "--epochs", "1", "--max_steps", "1")

    def builds_weights(*a, **k):
        raise AssertionError("a model was built before the checkpoint was checked")

    monkeypatch.setattr(main_jepat, "make_model", builds_weights)  # both refusals come before any model
    with pytest.raises(ValueError, match="tiny.*base|base.*tiny"):
        run_main(tmp_path, "--model", "base", "--resume", str(tmp_path / "checkpoint-last.pth"))
    # another global batch would change what a step is (lr, schedules): refused, naming the fix
    with pytest.raises(UserError, match=r"global batch of 1 x 8 x 1 = 8 .* this run has 1 x 4 x 1.*--accum_iter"):
        run_main(tmp_path, "--batch_size", "4", "--resume", str(tmp_path / "checkpoint-last.pth"))
    # weights without a training state (the optimizer, counters and generators) cannot be resumed
    ckpt = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    torch.save({k: v for k, v in ckpt.items() if k != "state"}, tmp_path / "weights.pth")
    with pytest.raises(CheckpointFileError, match=r"weights.pth holds weights but no training state.*main_sample"):
        run_main(tmp_path, "--resume", str(tmp_path / "weights.pth"))
    with pytest.raises(UserError, match="checkpoint_format sharded needs runtime.strategy fsdp"):
        run_main(tmp_path / "sharded", "--checkpoint_format", "sharded")


def test_schedules_apply_what_they_log():
    opt = torch.optim.AdamW(
        [
            {"params": [torch.nn.Parameter(torch.zeros(2, 2))], "decay": True},
            {"params": [torch.nn.Parameter(torch.zeros(2))], "weight_decay": 0.0, "decay": False},
        ]
    )
    lr = LRSchedule(1e-3, warmup_steps=10, total_steps=100, kind="cosine")
    assert lr(0) == pytest.approx(1e-4) and lr(9) == pytest.approx(1e-3) and lr(100) == pytest.approx(0.0)
    assert lr.apply(opt, 50) == opt.param_groups[0]["lr"] == opt.param_groups[1]["lr"]
    wd = WeightDecaySchedule(0.02, 0.2, 100)
    assert wd.apply(opt, 100) == pytest.approx(0.2) == opt.param_groups[0]["weight_decay"]
    assert opt.param_groups[1]["weight_decay"] == 0.0
    ema = CosineValue(0.99, 0.9999, 100)
    assert ema(0) == pytest.approx(0.99) and ema(100) == pytest.approx(0.9999) and ema(0) < ema(50) < ema(100)


def test_resumable_sampler_positions():
    s = DataOrder(40, 4, seed=3)
    s.set_epoch(1)
    whole = list(s)
    s.set_position(1, 3)
    assert list(s) == whole[12:]
    ranks = [DataOrder(40, 2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(1)
    a, b = list(ranks[0]), list(ranks[1])
    assert sorted(a[:2] + b[:2]) == sorted(whole[:4])  # two ranks of 2 = one process of 4


@pytest.mark.parametrize("script", ["main_jepat", "main_sample", "main_cache"])
def test_help_works(script, capsys):
    parser = importlib.import_module(script).get_args_parser()
    with pytest.raises(SystemExit) as exit_:
        parser.parse_args(["--help"])
    assert exit_.value.code == 0 and "usage" in capsys.readouterr().out


@pytest.mark.parametrize("flag", ["--model", "--text_encoder", "--dataset", "--tokenizer"])
def test_unknown_choices_are_argparse_errors(flag, capsys):
    with pytest.raises(SystemExit) as exit_:
        main_jepat.get_args_parser().parse_args([flag, "gigantic"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "invalid choice" in err
    if flag == "--model":
        assert "tiny" in err and "base" in err  # the choices are listed


def test_flow_time_sampling_flag(capsys):
    def parse(argv):
        return main_jepat.parse_args(argv).config.model

    assert parse([]).t_logit_mean == -0.8  # the CPU recipe: logit-normal, towards noise
    assert parse(["--t_logit_mean", "none"]).t_logit_mean is None  # uniform t, given over the recipe's -0.8
    assert parse(["--t_logit_mean", "-1.5"]).t_logit_mean == -1.5
    assert parse(["--config", "imagenet-base"]).t_logit_mean is None  # the published uniform t
    with pytest.raises(SystemExit):
        parse(["--t_logit_mean", "low"])
    assert "expected float or none" in capsys.readouterr().err


def test_scripts_pass_bash_n():
    scripts = sorted((ROOT / "scripts").glob("*.sh"))
    assert scripts
    for script in scripts:
        out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert out.returncode == 0, (script, out.stderr)


def test_main_sample_writes_images_grid_and_manifest(tmp_path, caplog):
    import main_sample

    run_main(tmp_path / "run", "--epochs", "1", "--max_steps", "2")
    out = tmp_path / "samples"
    args = main_sample.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(tmp_path / "run" / "checkpoint-last.pth"),
            "--prompt",
            "a red circle",
            "--prompt",
            "",
            "--num_per_prompt",
            "2",
            "--out_dir",
            str(out),
            *"--num_iter 2 --ode_steps 2 --device cpu".split(),
        ]
    )
    with caplog.at_level("WARNING"):
        rows = main_sample.main(args)
    assert len(rows) == 4 and (out / "grid.png").is_file() and len(list(out.glob("0*.png"))) == 4
    assert "null condition" in caplog.text
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [m["prompt"] for m in manifest] == ["a red circle", "a red circle", "", ""]


def test_shapes_evaluation_writes_grids_manifest_and_metrics(tmp_path):
    args = [a for a in SMALL if a != "--no_eval"]
    ns = main_jepat.get_args_parser().parse_args(
        args
        + [
            "--output_dir",
            str(tmp_path),
            *"--epochs 1 --max_steps 2 --eval_per_combo 2 --num_iter 2 --ode_steps 2 --grid_freq 1".split(),
        ]
    )
    result = main_jepat.main(ns)
    for name in ("grid_seen.png", "grid_heldout.png", "grid_heldout_words.png", "manifest.jsonl", "metrics.json"):
        assert (tmp_path / name).is_file(), name
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["seen"]["n"] == 15 * 2 and metrics["heldout"]["n"] == 3 * 2
    assert metrics["heldout_words"]["n"] == 15 * 1  # half as many per seen combination
    assert 0.0 <= metrics["seen"]["joint_acc"] <= 1.0 and result["seen"] == metrics["seen"]
    for split in ("seen", "heldout"):
        assert metrics[split]["fd"] >= 0 and metrics[split]["fd_floor"] > 0 and metrics[split]["spread"] >= 0
    rows = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert len(rows) == 36 + 15 and all((tmp_path / r["file"]).is_file() for r in rows)
    words = [r["prompt"] for r in rows if r["split"] == "heldout_words"]
    assert words[0] == "a drawing of a crimson circle" and not set(words) & set(shapes.all_captions())
    heldout_targets = {tuple(r["target"]) for r in rows if r["split"] == "heldout"}
    assert heldout_targets == {("red", "triangle"), ("blue", "circle"), ("yellow", "square")}


def test_non_finite_loss_stops_with_an_error_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    run_main(tmp_path, "--epochs", "2", "--max_steps", "3")
    good = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    from models.loss import JEPATLoss

    real = JEPATLoss.__call__

    def poisoned(*a, **k):
        out = real(*a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(JEPATLoss, "__call__", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite"):
        run_main(
            tmp_path, "--epochs", "2", "--resume", str(tmp_path / "checkpoint-last.pth"), "--save_every_steps", "1"
        )
    kept = torch.load(tmp_path / "checkpoint-last.pth", weights_only=True)
    assert kept["state"]["step"] == good["state"]["step"] == 3


def test_auto_precision_on_the_cpu_follows_the_measured_bf16_speed(monkeypatch):
    from util import runtime

    cpu = torch.device("cpu")
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: False)  # no native bf16: no measuring
    runtime.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(torch, "randn", lambda *a, **k: pytest.fail("measured although bf16 is emulated"))
    assert runtime.cpu_bf16_speedup() == 0.0 and runtime.resolve_precision(cpu, "auto") == "fp32"
    monkeypatch.undo()
    for speedup, expected in ((0.05, "fp32"), (1.0, "fp32"), (1.8, "bf16")):
        monkeypatch.setattr(runtime, "cpu_bf16_speedup", lambda s=speedup: s)
        assert runtime.resolve_precision(cpu, "auto") == expected
    assert runtime.resolve_precision(cpu, "fp32") == "fp32" and runtime.resolve_precision(cpu, "bf16") == "bf16"
    monkeypatch.undo()
    runtime.cpu_bf16_speedup.cache_clear()
    monkeypatch.setattr(runtime, "cpu_bf16_flags", lambda: None)  # unknown CPU: measured
    assert runtime.cpu_bf16_speedup(n=64, reps=1) > 0
    runtime.cpu_bf16_speedup.cache_clear()


def test_a_stop_signal_that_lands_during_the_rank_agreement_is_not_lost():
    import signal as sig

    class Env:  # two ranks; the signal arrives while the first agreement is in flight
        initialized, started = True, []

        def max_over_ranks_async(self, value):
            self.started.append(value)
            if len(self.started) == 1:
                stops._on_signal(sig.SIGUSR1, None)
            return lambda: value

    stops = engine_jepat.StopSignals(Env())
    assert not stops.requested() and not stops.requested()  # the first agreement carried no signal yet
    assert stops.requested() and stops.signal == sig.SIGUSR1  # the next one did: one step later, not lost
    assert Env.started == [0, sig.SIGUSR1, sig.SIGUSR1]


def test_no_host_sync_between_log_steps(tmp_path, monkeypatch):
    """Counted with a dispatch mode: ``.item()``, ``float(t)``, ``bool(t)`` and ``.tolist()`` all run
    ``aten._local_scalar_dense``. Between log steps there is none, except host-side work that never
    waits for a device: the mask ratio drawn from the CPU host generator, the optimizer's CPU step
    counters (fused AdamW on GPUs keeps them on the device) and the loader's start of an epoch."""
    from torch.utils.data import DataLoader

    import models.loss
    from util.runtime import init_runtime
    from util.training.throughput import HostSyncs

    syncs = HostSyncs("cpu")
    allowed = syncs.allow

    for module, name in ((engine_jepat, "_log"), (models.loss, "sample_mask_ratio"), (engine_jepat, "_end_epoch"),
                         (engine_jepat, "_finish"), (DataLoader, "__iter__")):  # fmt: skip
        monkeypatch.setattr(module, name, allowed(getattr(module, name)))
    argv = SMALL + ["--output_dir", str(tmp_path), "--epochs", "1", "--max_steps", "6", "--log_freq", "3"]
    run = main_jepat.build_run(main_jepat.parse_args(argv).config, init_runtime("cpu"))
    monkeypatch.setattr(run.optimizer, "step", allowed(run.optimizer.step))
    with syncs:
        engine_jepat.train(run)
    assert syncs.count == 0, syncs.where[0]
    assert syncs.allowed > 0  # the counter sees the read-backs it allows


def test_counting_flops_leaves_no_trace(tmp_path):
    """The FLOP count runs one extra forward and backward at a run's first step: every random state
    (global, and the host generator of the mask ratio) and the gradients are as before it, so the
    run (also one whose tokenizer draws, such as a VAE's posterior) trains as it would have."""
    from util.runtime import init_runtime

    run = main_jepat.build_run(
        main_jepat.parse_args(SMALL + ["--output_dir", str(tmp_path)]).config, init_runtime("cpu")
    )
    images, captions = next(iter(run.loader))
    x, text = run.inputs(images, captions)
    torch.manual_seed(5)
    before, host = torch.get_rng_state(), run.state.host_generator.get_state()
    meter = engine_jepat.StepMeter(torch.device("cpu"), 8)
    meter.count_flops(run, x, text)
    assert meter.flops > 0 and meter.peak > 0
    assert torch.equal(torch.get_rng_state(), before) and torch.equal(run.state.host_generator.get_state(), host)
    assert all(p.grad is None for p in run.model.parameters())
