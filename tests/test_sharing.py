"""Share and show: the Hugging Face-style model folder (export, then sample and evaluate from it as
from the checkpoint), W&B logging in offline mode, and the run's curves.png. The run they read is
the session's ``shapes_run`` (tests/conftest.py)."""

from __future__ import annotations

import json
import re
import struct
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import main_jepat
import main_sample
from models.safe_load import CheckpointFileError
from tests.test_train import SMALL
from util.pretrained import load_pretrained
from util.runtime import user_errors
from util.training.checkpoint import checkpoint_recipe
from util.training.curves import plot_curves
from util.training.loggers import RunLogger, parse_log_with

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def run_dir(shapes_run) -> Path:
    return shapes_run


def export(checkpoint: Path, folder: Path) -> None:
    args = main_sample.get_args_parser().parse_args(["--checkpoint", str(checkpoint), "--export_dir", str(folder)])
    assert main_sample.main(args) == []  # no prompts: export only


def test_exported_folder_samples_and_evaluates_like_its_checkpoint(run_dir, tmp_path):
    ckpt_path, folder = run_dir / "checkpoint-last.pth", tmp_path / "exported"
    export(ckpt_path, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "metrics.json", "model.safetensors"]
    ckpt = torch.load(ckpt_path, weights_only=True)
    weights = load_file(folder / "model.safetensors")
    assert weights.keys() == ckpt["ema"].keys() and all(torch.equal(weights[k], ckpt["ema"][k]) for k in weights)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_config"] == ckpt["model_config"] and config["step"] == 2
    assert config["config"] == json.loads(json.dumps(ckpt["config"]))  # the run's whole tree travels with it
    recipe = checkpoint_recipe(config)
    assert recipe["image"] == {"tokenizer": "pixels", "vae_path": None, "patch_size": 8, "img_size": 16}
    assert recipe["captions"]["text_encoder"] == "minilm" and recipe["captions"]["dataset"] == "shapes"
    assert recipe["captions"]["token_dim"] == 384 and recipe["captions"]["pooled_dim"] == 384
    assert (
        recipe["sampling"]["num_iter"] == 4
        and recipe["sampling"]["ode_solver"] == ckpt["config"]["sampling"]["ode_solver"]
    )
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "step 2" in card and "shapes, seen combinations" in card
    # --evaluate on the folder reproduces the run's own evaluation, image for image
    args = [a for a in SMALL if a != "--no_eval"] + [
        "--evaluate",
        "--resume",
        str(folder),
        "--output_dir",
        str(tmp_path / "eval"),
        "--eval_per_combo",
        "1",
    ]
    result = main_jepat.main(main_jepat.get_args_parser().parse_args(args))
    run_metrics = json.loads((run_dir / "metrics.json").read_text())
    judged = lambda m: {k: m[k] for k in ("n", "color_acc", "shape_acc", "joint_acc")}  # noqa: E731 (not timings)
    assert result["step"] == 2
    assert judged(result["seen"]) == judged(run_metrics["seen"]) and judged(result["heldout"]) == judged(
        run_metrics["heldout"]
    )
    for grid in ("grid_seen.png", "grid_heldout.png"):
        assert (tmp_path / "eval" / grid).read_bytes() == (run_dir / grid).read_bytes(), grid
    # and main_sample.py samples from it
    args = main_sample.get_args_parser().parse_args(
        [
            "--checkpoint",
            str(folder),
            "--prompt",
            "a red circle",
            "--num_per_prompt",
            "2",
            "--out_dir",
            str(tmp_path / "s"),
        ]
    )
    assert len(main_sample.main(args)) == 2 and (tmp_path / "s" / "grid.png").is_file()


def test_bad_folders_name_the_file_and_what_was_expected(run_dir, tmp_path):
    folder = tmp_path / "model"
    export(run_dir / "checkpoint-last.pth", folder)
    with pytest.raises(ValueError, match="EMA weights only"):
        load_pretrained(folder, raw=True)
    weights = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(weights[: len(weights) // 3])
    with pytest.raises(CheckpointFileError, match=r"model.safetensors is not a readable safetensors file"):
        load_pretrained(folder)
    (folder / "config.json").write_text('{"format": "something-else"}')
    with pytest.raises(CheckpointFileError, match=r"config.json is not the config of a JEPA-T model"):
        load_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointFileError, match=r"is not a JEPA-T model folder: no config.json"):
        load_pretrained(folder)
    with pytest.raises(SystemExit, match=r"^error: .*is not a JEPA-T model folder"), user_errors():
        export(folder, tmp_path / "not_written")  # what the script prints, and exits 1 with
    assert not (tmp_path / "not_written").exists()


def wandb_history(run_file: Path) -> list:
    """The history rows of a .wandb file: a LevelDB-style log (7-byte file header, 32 KiB blocks,
    records cut into chunks with a 7-byte header) of W&B protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, rows = run_file.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:
            pos += left
            continue
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
    return rows


def test_wandb_offline_run_holds_the_same_scalars(run_dir):
    runs = list((run_dir / "wandb_home" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    rows = wandb_history(runs[0])
    logged = json.loads((run_dir / "train_log.json").read_text())[-1]
    train = next(r for r in rows if "train/loss" in r)
    assert train["_step"] == logged["step"] == 2
    assert train["train/loss"] == pytest.approx(logged["loss"]) and train["train/lr"] == pytest.approx(logged["lr"])
    evaluation = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert evaluation["eval/seen_joint_acc"] == pytest.approx(metrics["seen"]["joint_acc"])
    images = {k.rpartition("/")[0] for r in rows for k in r if k.endswith("/_type") and r[k] == "image-file"}
    assert {"samples/ema", "eval/grid_seen", "eval/grid_heldout"} <= images
    assert (run_dir / "wandb_run_id.txt").read_text().strip() in runs[0].name
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))  # TensorBoard as well


def test_wandb_is_imported_only_when_asked_for(tmp_path, monkeypatch):
    """No project file imports wandb but the logger, inside the function that is asked for it (timm
    tries an ``import wandb`` of its own and copes without it); with the import made to fail, a
    TensorBoard logger still opens and asking for wandb says how to get it."""
    importers = [
        str(f.relative_to(ROOT))
        for f in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("util/**/*.py")) + sorted(ROOT.glob("models/**/*.py"))
        if re.search(r"^\s*(import wandb|from wandb)", f.read_text(), re.M) or 'import_module("wandb")' in f.read_text()
    ]
    assert importers == ["util/training/loggers.py"]
    monkeypatch.setitem(sys.modules, "wandb", None)  # ``import wandb`` now raises ImportError
    RunLogger.open(("tensorboard",), tmp_path, {}).close()
    with pytest.raises(RuntimeError, match="log_with wandb needs the wandb package"):
        RunLogger.open(("tensorboard", "wandb"), tmp_path, {})


def test_log_with_takes_a_comma_list():
    assert parse_log_with("tensorboard") == ("tensorboard",)
    assert parse_log_with("wandb, tensorboard,wandb") == ("wandb", "tensorboard")
    assert parse_log_with("none") == ()
    with pytest.raises(ValueError, match="unknown logger"):
        parse_log_with("tensorboard,mlflow")
    assert main_jepat.parse_args([]).config.runtime.log_with == "tensorboard"  # TensorBoard stays the default
    with pytest.raises(SystemExit, match="unknown logger"), user_errors():  # said at start-up, not after training
        main_jepat.parse_args(["--log_with", "mlflow"])


def test_curves_png_is_written_at_the_end_of_training(run_dir, tmp_path):
    png = run_dir / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5_000
    history = [{"step": s, "loss": 2 / s, "flow_loss": 1.5 / s, "jepa_loss": 0.5 / s, "lr": 1e-3} for s in (1, 2, 3)]
    evals = {"seen_joint_acc": [(1, 0.2), (3, 0.5)], "FID-1K": [(3, 40.0)]}
    path = plot_curves(history, evals, tmp_path / "c.png")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1260, 640)  # 4 panels: 3 columns, 2 rows
