"""Evaluation prompts default to the training captions; class-name files in both shipped formats;
the preflight that stops a run at start-up for what its evaluation will need."""

import json
import time

import numpy as np
import pytest
import torch
from PIL import Image

import main_jepat
from util.errors import UserError
from util.evaluation.prompts import read_class_names
from util.training.checkpoint import checkpoint_recipe

FOLDERS = {"n01440764": "tench", "n01443537": "goldfish", "my_class": "my class"}  # sorted: my_class first
RUN = (
    "--dataset imagenet --img_size 16 --patch_size 8 --batch_size 4 --epochs 1 --grid_freq 0 "
    "--num_workers 0 --precision fp32 --device cpu --log_freq 1"
).split()
FAST_EVAL = (
    "--eval_metrics isc --fid_feature_extractor jepat-test-tiny --num_iter 2 --ode_steps 2 --eval_batch_size 3".split()
)


def class_folders(root):
    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        (root / "train" / folder).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(
                root / "train" / folder / f"{i}.png"
            )
    return root


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def test_class_checkpoint_is_evaluated_on_its_training_prompts(tmp_path, one_thread):
    data = class_folders(tmp_path / "data")
    run = tmp_path / "run"
    main_jepat.main(
        main_jepat.parse_args(
            RUN + ["--data_path", str(data), "--max_steps", "1", "--no_eval", "--output_dir", str(run)]
        )
    )
    ckpt = torch.load(run / "checkpoint-last.pth", weights_only=True)
    training = ["a photo of a my class", "a photo of a tench", "a photo of a goldfish"]
    assert checkpoint_recipe(ckpt)["captions"]["source"] == {
        "kind": "class",
        "class_prompts": training,
        "class_names": ["my class", "tench", "goldfish"],
        "template": "a photo of a {}",
    }
    # --evaluate with no prompt flags: class-balanced, exactly the training prompts
    ev = tmp_path / "eval"
    m = main_jepat.main(
        main_jepat.parse_args(
            RUN
            + FAST_EVAL
            + ["--evaluate", "--resume", str(run / "checkpoint-last.pth"), "--num_images", "6", "--output_dir", str(ev)]
        )
    )
    assert m["prompts"] == "training class prompts" and m["num_samples"] == 6 and m["num_classes"] == 3
    assert m["unseen_prompts"] == 0 and m["fidelity"]["num_samples"] == 6
    assert [r["prompt"] for r in manifest(ev)] == training * 2 and [r["label"] for r in manifest(ev)] == [0, 1, 2] * 2

    # the shipped wnid<TAB>name file and a plain list give the same names; the template is the training one
    (tmp_path / "wnids.txt").write_text("n01440764\ttench\nn01443537\tgoldfish\nn99999999\tred fox\n")
    (tmp_path / "plain.txt").write_text("tench\ngoldfish\nred fox\n")
    assert read_class_names(str(tmp_path / "wnids.txt")) == read_class_names(str(tmp_path / "plain.txt"))
    ev2 = tmp_path / "eval_names"
    m = main_jepat.main(
        main_jepat.parse_args(
            RUN
            + FAST_EVAL
            + [
                "--evaluate",
                "--resume",
                str(run / "checkpoint-last.pth"),
                "--num_images",
                "3",
                "--eval_class_names",
                str(tmp_path / "wnids.txt"),
                "--output_dir",
                str(ev2),
            ]
        )
    )
    assert [r["prompt"] for r in manifest(ev2)] == [
        "a photo of a tench",
        "a photo of a goldfish",
        "a photo of a red fox",
    ]
    assert m["unseen_prompts"] == 1 and m["template"] == "a photo of a {}"


def test_missing_inception_weights_stop_a_run_before_its_first_step(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty_hub"))
    (tmp_path / "prompts.txt").write_text("a red circle\n")
    out = tmp_path / "run"
    t0 = time.time()
    with pytest.raises(UserError, match="preflight: no Inception weights at .*empty_hub"):
        main_jepat.main(
            main_jepat.parse_args(
                [
                    *(
                        "--img_size 16 --patch_size 8 --num_samples 32 --batch_size 8 --device cpu --precision "
                        "fp32 --eval_prompts_file"
                    ).split(),
                    str(tmp_path / "prompts.txt"),
                    "--output_dir",
                    str(out),
                ]
            )
        )
    assert not list(out.glob("checkpoint-*.pth")) and not (out / "train_log.json").exists()
    assert time.time() - t0 < 60
    # an output folder that cannot be written stops the run at start-up too
    blocked = tmp_path / "file_not_folder"
    blocked.write_text("")
    with pytest.raises(UserError, match="output folder .*file_not_folder/run is not writable"):
        main_jepat.main(
            main_jepat.parse_args(
                [
                    *"--img_size 16 --patch_size 8 --num_samples 32 --device cpu --output_dir".split(),
                    str(blocked / "run"),
                ]
            )
        )
