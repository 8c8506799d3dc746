"""The configuration tree: recipes are files of overrides, the published recipes are the published
scripts (read against docs/recipes.md), flags and dotted overrides over them, checkpoints that carry
the resolved tree, and old checkpoints that still load."""

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import main_cache
import main_jepat
from models.jepat import JEPAT_MODELS, JEPATConfig
from models.loss import PUBLISHED_JEPA_BETA
from models.sampler import SamplingConfig
from tests.test_train import SMALL, run_main
from util.config import ConfigError, TrainConfig, from_dict, from_flat_args, recipe_names, resolve, settings, to_dict
from util.errors import UserError
from util.training.checkpoint import FORMAT_VERSION, checkpoint_recipe

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("base", "large", "huge")


def recipe_table():
    """The rows of docs/recipes.md's table: setting -> (published, ours, why)."""
    text = (ROOT / "docs" / "recipes.md").read_text()
    body = text.split("<!-- recipe-table")[1].split("<!-- end recipe-table -->")[0]
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and re.fullmatch(r"[a-z_]+\.[a-z_]+", cells[0]):
            rows[cells[0]] = tuple(cells[1:])
    return rows


def per_preset(cell: str):
    """'1400 / 480 / 320' -> three values, '0.7' -> the same value three times (parsed as YAML)."""
    parts = [p.strip() for p in cell.split(" / ")] if " / " in cell else [cell] * 3
    return [yaml.safe_load(p) for p in parts]


def test_the_published_recipes_are_the_table_of_published_settings():
    rows = recipe_table()
    # everything the published launch scripts pass, and the code defaults that shape the run, is a row
    assert {
        "optim.epochs",
        "model.qk_norm",
        "optim.adamw_eps",
        "runtime.grad_checkpointing",
        "runtime.compile",
        "sampling.temperature",
        "model.fusion",
        "optim.batch_size",
        "optim.blr",
        "optim.warmup_epochs",
        "model.diffusion_batch_mul",
        "sampling.num_iter",
        "sampling.guidance_scale",
        "runtime.precision",
        "loss.jepa_weight",
        "captions.clip_model",
        "eval.batch_size",
    } <= set(rows)
    for path, (published, ours, why) in rows.items():
        assert path in settings(), path
        if per_preset(published) != per_preset(ours):
            assert why.startswith("departure:"), (path, "differs from the published value without a departure note")
        section, name = path.split(".")
        for preset, want in zip(PRESETS, per_preset(ours)):
            got = getattr(getattr(resolve([f"imagenet-{preset}"]), section), name)
            assert (list(got) if isinstance(got, tuple) else got) == want, (preset, path, got, want)
    # the published scripts, in the values the issue names
    c = {p: resolve([f"imagenet-{p}"]) for p in PRESETS}
    assert [c[p].optim.epochs for p in PRESETS] == [1400, 480, 320]
    assert all(
        c[p].model.qk_norm
        and c[p].optim.adamw_eps == 1e-6
        and c[p].runtime.compile
        and c[p].runtime.grad_checkpointing
        and c[p].sampling.temperature == 0.94
        and c[p].model.fusion == "full"
        for p in PRESETS
    )
    assert JEPAT_MODELS["huge"].arch["width"] == 1280 and JEPATConfig.buffer_size == 64


def test_the_late_recipes_follow_the_papers_text_and_differ_only_in_fusion():
    for preset in PRESETS:
        code, text = to_dict(resolve([f"imagenet-{preset}"])), to_dict(resolve([f"imagenet-{preset}-late"]))
        diff = {(s, k) for s in code if isinstance(code[s], dict) for k in code[s] if code[s][k] != text[s][k]}
        assert diff == {("model", "fusion")} and text["model"]["fusion"] == "late_only"


def test_defaults_live_once_in_the_tree():
    """The tree's model and loss defaults are read from the network's and the loss's own
    dataclasses, and the published recipe files add only what differs from the tree."""
    tree = TrainConfig()
    for name in (
        "mask_ratio_min",
        "mask_ratio_std",
        "cond_drop_prob",
        "diffusion_batch_mul",
        "qk_norm",
        "t_logit_mean",
        "t_logit_std",
        "flow_prediction",
        "fusion",
    ):
        assert getattr(tree.model, name) == getattr(JEPATConfig, name), name
    assert tree.loss.jepa_beta == PUBLISHED_JEPA_BETA == 2.0 and tree.sampling == SamplingConfig()
    base = yaml.safe_load((ROOT / "configs" / "imagenet-base.yaml").read_text())
    for section, values in base.items():
        for name, value in values.items():
            default = getattr(getattr(tree, section), name)
            assert value != default or name == "buffer_size", f"{section}.{name} repeats the default {value!r}"


def test_every_setting_is_a_flag_with_help_and_flags_override_the_recipe():
    parser = main_jepat.get_args_parser()
    dests = {a.dest for a in parser._actions}
    assert {f"set:{p}" for p in settings() if not p.startswith("cache.")} <= dests
    launch = main_jepat.parse_args(
        (
            "--config imagenet-large --mask_ratio_min 0.5 --no-grad_checkpointing --optim.batch_size "
            "4 sampling.guidance_scale=2.5"
        ).split()
    )
    c = launch.config
    assert c.model.mask_ratio_min == 0.5 and c.runtime.grad_checkpointing is False and c.optim.batch_size == 4
    assert c.sampling.guidance_scale == 2.5 and c.model.preset == "large" and c.optim.epochs == 480
    assert launch.given == {
        "model.mask_ratio_min": 0.5,
        "runtime.grad_checkpointing": False,
        "optim.batch_size": 4,
        "sampling.guidance_scale": 2.5,
    }
    assert c.runtime.output_dir == "output/imagenet-large"
    with pytest.raises(SystemExit):
        parser.parse_args(["--fusion", "sideways"])
    text = " ".join(parser.format_help().split())  # the script itself runs in the log-file test
    assert "--optim.adamw_eps" in text and "AdamW epsilon [default 1e-06]" in text


def test_an_experiment_is_a_small_file_and_bad_settings_name_the_file_and_key(tmp_path):
    mine = tmp_path / "my_run.yaml"
    mine.write_text("base: imagenet-base\noptim:\n  batch_size: 8\nsampling:\n  guidance_scale: 4.0\n")
    c = resolve([str(mine)], {"optim.epochs": 2})
    assert (c.optim.batch_size, c.optim.epochs, c.sampling.guidance_scale, c.model.preset) == (8, 2, 4.0, "base")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  batch_sise: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*batch_sise"):
        resolve([str(bad)])
    bad.write_text("optim:\n  batch_size: eight\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*optim.batch_size"):
        resolve([str(bad)])
    with pytest.raises(ConfigError, match=r"model.fusion = 'sideways' is not one of"):
        resolve(["shapes"], dotlist=["model.fusion=sideways"])
    with pytest.raises(ConfigError, match="unknown recipe 'imagenet-tiny'"):
        resolve(["imagenet-tiny"])
    assert {"shapes", "imagenet-base", "imagenet-huge-late", "fast-sampling"} <= set(recipe_names())


def test_caching_and_training_read_the_same_recipe():
    ns = main_cache.get_args_parser().parse_args(
        "--config imagenet-base --dataset imagenet --data_path /data --cache_dir /tmp/c --batch_size 8".split()
    )
    cache = main_cache.resolve_args(ns)
    train = resolve(["imagenet-base"])
    assert (cache.captions, cache.model.tokenizer, cache.model.img_size) == (
        train.captions,
        train.model.tokenizer,
        train.model.img_size,
    )
    assert cache.cache.batch_size == 8 and cache.optim.batch_size == 32 and cache.cache.dataset == "imagenet"
    with pytest.raises(UserError, match="--dataset imagenet needs --data_path"):
        main_cache.resolve_args(main_cache.get_args_parser().parse_args(["--cache_dir", "/tmp/c"]))
    # a training run on `cached` data reads the cache the same file names
    assert resolve(["imagenet-base"], dotlist=["cache.cache_dir=/tmp/c"]).cache_path == "/tmp/c"


def test_checkpoint_carries_its_tree_and_sampling_defaults_follow_it(tmp_path):
    run_main(tmp_path / "run", "--epochs", "1", "--max_steps", "1", "--temperature", "0.3", "--num_iter", "3")
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION == 4
    tree = from_dict(ckpt["config"])
    assert tree.sampling == SamplingConfig(
        num_iter=3, guidance_scale=3.0, guidance_schedule="linear", temperature=0.3, ode_steps=20, ode_solver="heun"
    )
    assert tree == from_dict(yaml.safe_load((tmp_path / "run" / "config.yaml").read_text()))
    r = checkpoint_recipe(ckpt)
    assert r["captions"]["dataset"] == "shapes" and r["captions"]["text_encoder"] == "minilm"
    assert r["image"] == {"tokenizer": "pixels", "vae_path": None, "patch_size": 8, "img_size": 16}

    # --evaluate takes the checkpoint's sampling settings unless the command line gives one
    ev = main_jepat.main(
        main_jepat.get_args_parser().parse_args(
            SMALL
            + [
                "--evaluate",
                "--resume",
                str(tmp_path / "run" / "checkpoint-last.pth"),
                *"--eval_per_combo 1 --ode_steps 2 --output_dir".split(),
                str(tmp_path / "ev"),
            ]
        )
    )
    assert ev["sampling"]["temperature"] == 0.3 and ev["sampling"]["num_iter"] == 3 and ev["sampling"]["ode_steps"] == 2
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["sampling"] == ev["sampling"] and saved["num_samples"] == 18 + 15  # + held-out words


def test_older_checkpoints_still_load_under_todays_names():
    # format 3 kept the sampling dictionary under the old names
    v3 = {
        "sampling": {
            "num_iter": 4,
            "cfg": 2.0,
            "cfg_schedule": "constant",
            "temperature": 0.7,
            "ode_steps": 5,
            "sampler": "euler",
        },
        "captions": {"dataset": "shapes"},
        "image": {"patch_size": 4},
    }
    assert SamplingConfig(**checkpoint_recipe(v3)["sampling"]) == SamplingConfig(4, 2.0, "constant", 0.7, 5, "euler")
    # format 1 kept everything among its flat launch arguments
    args = {
        "num_iter": 4,
        "cfg": 2.0,
        "cfg_schedule": "constant",
        "temperature": 0.7,
        "ode_steps": 5,
        "sampler": "euler",
        "dataset": "shapes",
        "data_path": "",
        "text_encoder": "minilm",
        "model": "tiny",
        "clip_model": "ViT-L-14",
        "text_encoder_path": None,
        "text_max_length": 16,
        "vae_path": None,
        "log_with": ["tensorboard"],
        "resolved_lr": 0.1,
        "recipe": "shapes",
    }
    v1 = {
        "args": args,
        "text_encoder": {"name": "minilm", "token_dim": 384, "pooled_dim": 384, "max_length": 16},
        "tokenizer": "pixels",
        "patch_size": 4,
        "img_size": 24,
    }
    r = checkpoint_recipe(v1)
    assert SamplingConfig(**r["sampling"]) == SamplingConfig(4, 2.0, "constant", 0.7, 5, "euler")
    assert r["captions"]["token_dim"] == 384 and r["image"]["patch_size"] == 4
    tree = from_flat_args(args)  # the converter to a tree: renamed flags placed, derived values dropped
    assert (
        tree.model.preset == "tiny" and tree.sampling.ode_solver == "euler" and tree.runtime.log_with == "tensorboard"
    )
    assert dataclasses.asdict(tree.captions)["text_max_length"] == 16


def test_a_log_file_gets_one_line_per_interval_and_no_progress_frames(tmp_path):
    """stderr is a file here (not a terminal): no carriage-return frames, one line per log_freq steps."""
    argv = [a for a in SMALL if a not in ("--log_freq", "2")] + [
        *"--log_freq 3 --epochs 1 --max_steps 6 --output_dir".split(),
        str(tmp_path),
    ]
    out = subprocess.run(
        [sys.executable, "main_jepat.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr and "\r" not in out.stdout
    steps = [line for line in out.stderr.splitlines() if "engine_jepat" in line and ": loss " in line]
    assert [s.split(" step ")[1].split(":")[0] for s in steps] == ["3", "6"], steps
