"""The README's real-data path, run as the README writes it, in miniature: the commands of its
marked block, with its variables set to small local data and flags appended that shrink the run
(a tiny model, 16 px pixels, MiniLM, two CPU processes, the registered small feature extractor).
Class folders with bad files, a caption manifest with bad entries and WebDataset shards with bad
samples are each cached; class folders then go torchrun training -> evaluate -> sample, the caption
manifest torchrun training (which ends by evaluating), and the shards' caption table is checked row
by row (training from shards is tested in tests/test_webdataset.py). The test checks that the counts
add up, that evaluation prompts are the training captions and that metrics.json names its sample count."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from tests.test_caption_data import write_manifest
from tests.test_latent_cache import write_class_folders
from tests.test_webdataset import write_shards
from util.data.caption_table import CaptionTable

ROOT = Path(__file__).resolve().parents[1]
MARK = "<!-- tests/test_readme_path.py runs the commands of this block"
TEXT = ["--text_encoder", "minilm", "--text_max_length", "16", "--text_encoder_path", ""]
SMALL = {  # appended to each command: later flags win in argparse
    "cache_vae.sh": [
        *(
            "--img_size 16 --tokenizer pixels --shard_size 4 --batch_size 4 --num_workers 0 --device "
            "cpu --small_images skip"
        ).split(),
        *TEXT,
    ],
    "train": [
        *"--model tiny --img_size 16 --patch_size 8 --tokenizer pixels".split(),
        *TEXT,
        *(
            "--batch_size 1 --epochs 1 --max_steps 2 --device cpu --precision fp32 --num_workers 0 "
            "--grid_freq 0 --log_freq 1 --save_every_steps 0 --num_images 3 --eval_metrics isc "
            "--fid_feature_extractor jepat-test-tiny --num_iter 2 --ode_steps 2 --eval_batch_size 2 "
            "--no-compile --buffer_size none"
        ).split(),
    ],
    "evaluate": (
        "--device cpu --precision fp32 --num_images 6 --eval_metrics fid,isc "
        "--fid_feature_extractor jepat-test-tiny --eval_batch_size 2 --num_iter 2 --ode_steps 2"
    ).split(),
    "main_sample.py": "--device cpu --precision fp32 --num_iter 2 --ode_steps 2 --num_per_prompt 2".split(),
}


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text[text.index(MARK) :]
    block = block[block.index("```bash") + len("```bash") :]
    block = block[: block.index("```")].replace("\\\n", " ")
    return [line.strip() for line in block.splitlines() if line.strip() and not line.strip().startswith("#")]


def run(command: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    argv = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], a) for a in shlex.split(command)]
    if argv[0] == "torchrun":
        kind = "evaluate" if "--evaluate" in argv else "train"
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone"] + argv[1:] + SMALL[kind]
    elif argv[0] == "python":
        argv = [sys.executable] + argv[1:] + SMALL[Path(argv[1]).name]
    else:
        argv = argv + SMALL[Path(argv[1]).name]
    out = subprocess.run(argv, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, f"{' '.join(argv)}\n{out.stderr[-3000:]}"
    return out


def reference_images(folder: Path) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


@pytest.mark.parametrize("dataset", ["imagenet", "captions", "webdataset"])
def test_the_readme_path_runs_as_written(dataset, tmp_path):
    commands = readme_commands()
    assert [c.split()[0] for c in commands] == ["bash", "torchrun", "torchrun", "python"]
    data = {
        "imagenet": lambda: write_class_folders(tmp_path / "folders"),
        "captions": lambda: write_manifest(tmp_path / "data"),
        "webdataset": lambda: (write_shards(tmp_path / "shards"), tmp_path / "shards")[1],
    }[dataset]()
    env = {
        "DATASET": dataset,
        "DATA": str(data),
        "CACHE": str(tmp_path / "cache"),
        "VAE": "unused-by-pixels",
        "CLIP": "",
        "GPUS": "2",
        "RUN": str(tmp_path / "run"),
        "REF": str(reference_images(tmp_path / "ref")),
        "NPROC": "2",
        "OMP_NUM_THREADS": "1",
        "JEPAT_VENV": str(Path(sys.executable).parents[1]),
    }
    # every kind is cached; class folders and captions are also trained (training ends by evaluating
    # on its training prompts). A WebDataset cache is a caption cache like the manifest's: its table is
    # checked below, and training from shards runs in tests/test_webdataset.py. The separate
    # evaluation and sampling commands read only the checkpoint, so one kind runs them.
    steps = {"imagenet": commands, "captions": commands[:2], "webdataset": commands[:1]}[dataset]
    for command in steps:
        run(command, env)

    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    c = meta["counts"]
    assert c["seen"] == c["cached"] + c["skipped"] and c["pending"] == 0 and c["skipped"] > 0
    assert meta["flipped"] is (dataset == "imagenet")  # flips for class folders only
    vocabulary = json.loads((tmp_path / "cache" / "listing.json").read_text())["vocabulary"]
    if dataset == "webdataset":  # the samples' captions, each embedded by the cache's text encoder
        table = CaptionTable(tmp_path / "cache" / "text" / "minilm-len16")  # refuses an unfinished table
        assert vocabulary and len(table) == len(vocabulary)
        assert [table.caption(r) for r in range(len(table))] == vocabulary
        assert (table.find(vocabulary) == np.arange(len(vocabulary))).all()
        assert (np.abs(np.asarray(table.pooled, dtype=np.float32)).sum(axis=1) > 0).all()
        return
    tree = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert tree["data"]["dataset"] == "cached" and tree["recipe"] == "imagenet-base"
    evaluations = [(tmp_path / "run", 3)] + [(tmp_path / "run" / "eval-checkpoint-last", 6)] * (dataset == "imagenet")
    for folder, n in evaluations:
        m = json.loads((folder / "metrics.json").read_text())
        prompts = [json.loads(r)["prompt"] for r in (folder / "manifest.jsonl").read_text().splitlines()]
        assert m["num_samples"] == n == len(prompts) and m["ranks"] == 2
        assert m["prompts"] == ("training class prompts" if dataset == "imagenet" else "training captions")
        assert set(prompts) <= set(vocabulary) and m["unseen_prompts"] == 0
    if dataset != "imagenet":
        return
    assert m["fidelity"]["fid_label"] == "FID-6" and m["fidelity"]["reference_num_samples"] == 8
    assert set(prompts) == {v for v in vocabulary} and len(vocabulary) == 3  # every class, balanced
    samples = [json.loads(r) for r in (tmp_path / "run" / "samples" / "manifest.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and (tmp_path / "run" / "samples" / "grid.png").is_file()
