"""Named recipes: one source of every default, flags over it, and checkpoints that carry their own
sampling, caption and image recipe (so a renamed flag never breaks an old checkpoint)."""
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import main_jepat
from models.jepat import JEPAT_MODELS, JEPATConfig
from models.loss import PUBLISHED_JEPA_BETA, JEPATLoss
from models.sampler import SamplingConfig
from tests.test_train import SMALL, run_main
from util.recipes import RECIPES, recipe_keys
from util.training.checkpoint import FORMAT_VERSION, checkpoint_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_every_recipe_names_every_setting_and_each_setting_is_a_flag():
    keys = recipe_keys()
    dests = {a.dest for a in main_jepat.get_args_parser()._actions}
    assert keys <= dests, keys - dests
    for name in RECIPES:
        ns = main_jepat.parse_args(["--recipe", name])
        assert all(getattr(ns, k) == RECIPES[name][k] for k in keys) and ns.explicit == []
        assert ns.output_dir == f"output/{name}"


def test_published_recipes_are_the_dataclass_defaults():
    """JEPATConfig, SamplingConfig and JEPATLoss default to the published recipe; the imagenet
    recipes must say the same, and their presets must have the published widths and depths."""
    model = {f.name: f.default for f in dataclasses.fields(JEPATConfig) if f.default is not dataclasses.MISSING}
    sampling = dataclasses.asdict(SamplingConfig())
    loss = dataclasses.asdict(JEPATLoss())
    assert loss["jepa_beta"] == PUBLISHED_JEPA_BETA == 2.0
    for name in ("imagenet-base", "imagenet-large", "imagenet-huge"):
        r = RECIPES[name]
        for key, value in {**model, **sampling, **loss}.items():
            if key in r and r[key] is not None:
                assert r[key] == value, (name, key, r[key], value)
        arch = JEPAT_MODELS[r["model"]].arch
        assert arch.get("buffer_size", model["buffer_size"]) == 64 and r["buffer_size"] is None
    assert {k: v for k, v in arch.items() if "depth" in k or "width" in k} == {
        "width": 1280, "encoder_depth": 32, "predictor_depth": 32, "flow_width": 1536, "flow_depth": 12}
    # the CPU recipe differs where its figures were measured (documented in util/recipes.py)
    assert RECIPES["shapes"]["jepa_beta"] == 1.0 and RECIPES["shapes"]["temperature"] == 0.1


def test_flags_override_the_recipe_and_are_recorded_as_given():
    ns = main_jepat.parse_args(["--recipe", "imagenet-large", "--mask_ratio_min", "0.5", "--no-grad_checkpointing",
                                "--buffer_size", "none"])
    assert ns.mask_ratio_min == 0.5 and ns.grad_checkpointing is False and ns.buffer_size is None
    assert ns.model == "large" and ns.mask_ratio_std == 0.25            # the rest from the recipe
    assert ns.explicit == ["buffer_size", "grad_checkpointing", "mask_ratio_min"]
    with pytest.raises(SystemExit):
        main_jepat.parse_args(["--recipe", "imagenet-tiny"])


def test_help_shows_the_recipe_values():
    out = subprocess.run([sys.executable, "main_jepat.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert "recipe: shapes 0.2; imagenet-* 0.7" in out.stdout.replace("\n", " ").replace("  ", " ") or \
        "shapes 0.2; imagenet-* 0.7" in " ".join(out.stdout.split())


def test_checkpoint_carries_its_recipe_and_sampling_defaults_follow_it(tmp_path):
    run_main(tmp_path / "run", "--epochs", "1", "--max_steps", "1", "--temperature", "0.3", "--num_iter", "3")
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["format_version"] == FORMAT_VERSION >= 2      # the version that stores these dictionaries
    assert ckpt["sampling"] == {"num_iter": 3, "cfg": 3.0, "cfg_schedule": "linear", "temperature": 0.3,
                                "ode_steps": 20, "sampler": "heun"}
    assert ckpt["captions"]["dataset"] == "shapes" and ckpt["captions"]["text_encoder"] == "minilm"
    assert ckpt["image"] == {"tokenizer": "pixels", "vae_path": None, "patch_size": 8, "img_size": 16}
    # a format-1 checkpoint kept these among its argparse names; it is still read
    old = {"args": {"num_iter": 4, "cfg": 2.0, "cfg_schedule": "constant", "temperature": 0.7, "ode_steps": 5,
                    "sampler": "euler", "dataset": "shapes", "data_path": "", "text_encoder": "minilm",
                    "clip_model": "ViT-L-14", "text_encoder_path": None, "text_max_length": 16, "vae_path": None},
           "text_encoder": {"name": "minilm", "token_dim": 384, "pooled_dim": 384, "max_length": 16},
           "tokenizer": "pixels", "patch_size": 4, "img_size": 24}
    r = checkpoint_recipe(old)
    assert SamplingConfig(**r["sampling"]) == SamplingConfig(4, 2.0, "constant", 0.7, 5, "euler")
    assert r["captions"]["token_dim"] == 384 and r["image"]["patch_size"] == 4

    # --evaluate takes the checkpoint's sampling settings unless a flag gives one
    ev = main_jepat.main(main_jepat.get_args_parser().parse_args(
        SMALL + ["--evaluate", "--resume", str(tmp_path / "run" / "checkpoint-last.pth"), "--eval_per_combo", "1",
                 "--ode_steps", "2", "--output_dir", str(tmp_path / "ev")]))
    assert ev["sampling"]["temperature"] == 0.3 and ev["sampling"]["num_iter"] == 3 and ev["sampling"]["ode_steps"] == 2
    saved = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert saved["sampling"] == ev["sampling"] and saved["num_samples"] == 18


def test_a_log_file_gets_one_line_per_interval_and_no_progress_frames(tmp_path):
    """stderr is a file here (not a terminal): no carriage-return frames, one line per --log_freq steps."""
    argv = [a for a in SMALL if a not in ("--log_freq", "2")] + ["--log_freq", "3", "--epochs", "1", "--max_steps", "6",
                                                                 "--output_dir", str(tmp_path)]
    out = subprocess.run([sys.executable, "main_jepat.py", *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr and "\r" not in out.stdout
    steps = [line for line in out.stderr.splitlines() if "engine_jepat" in line and ": loss " in line]
    assert [s.split(" step ")[1].split(":")[0] for s in steps] == ["3", "6"], steps
