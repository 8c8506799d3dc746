"""main_jepat.py's evaluation end to end on the CPU: online evaluation every --eval_freq epochs,
prompts from a file and class-balanced class names, FID/IS/PR/KID with the registered test
extractor, the ADM .npz, TensorBoard, and the shapes evaluation with the linear probe."""

import json

import numpy as np
import pytest

import main_jepat
from tests.test_train import SMALL
from util.data import shapes

NO_EVAL_SMALL = [a for a in SMALL if a != "--no_eval"]
FAST_SAMPLING = ["--num_iter", "2", "--ode_steps", "2"]


def test_online_and_offline_evaluation_write_labelled_metrics(tmp_path, one_thread):
    ref = tmp_path / "ref"
    ref.mkdir()
    ds = shapes.ShapesDataset(split="all", num_samples=12, resolution=16, seed=3)
    for i in range(12):
        from PIL import Image

        Image.fromarray(ds.image(i)).save(ref / f"{i:03d}.png")
    (tmp_path / "prompts.txt").write_text("a red circle\n\na blue square\n")
    run = tmp_path / "run"
    fid_args = [
        "--fid_ref",
        str(ref),
        *"--fid_feature_extractor jepat-test-tiny --eval_metrics fid,isc,prc,kid --eval_batch_size 4".split(),
    ]
    ns = main_jepat.get_args_parser().parse_args(
        NO_EVAL_SMALL
        + FAST_SAMPLING
        + fid_args
        + [
            "--output_dir",
            str(run),
            *"--epochs 1 --eval_freq 1 --eval_prompts_file".split(),
            str(tmp_path / "prompts.txt"),
            "--num_images",
            "6",
            "--save_npz",
        ]
    )
    main_jepat.main(ns)
    for folder in (run / "eval-epoch0001", run):  # online, then after training
        m = json.loads((folder / "metrics.json").read_text())
        assert m["num_samples"] == 6 and m["step"] == 12 and m["sampling"]["num_iter"] == 2
        f = m["fidelity"]
        assert f["num_samples"] == 6 and f["reference_num_samples"] == 12 and f["fid_label"] == "FID-6"
        assert "fewer than 50000" in f["fid_note"] and {
            "precision",
            "recall",
            "kid_mean",
            "inception_score_mean",
        } <= set(f)
        assert "skipped" in m["clip_score"]
        assert (folder / "grid.png").is_file() and len(list((folder / "samples").glob("*.png"))) == 6
        rows = [json.loads(r) for r in (folder / "manifest.jsonl").read_text().splitlines()]
        assert [r["prompt"] for r in rows] == ["a red circle", "a blue square"] * 3
    arr = np.load(run / "samples_6x16x16x3.npz")["arr_0"]
    assert arr.shape == (6, 16, 16, 3) and arr.dtype == np.uint8
    assert list((run / "tb").glob("events.*"))

    # --evaluate: class-balanced prompts from a class-names file
    (tmp_path / "classes.txt").write_text("red circle\nblue square\ngreen triangle\n")
    ev = tmp_path / "eval_classes"
    ns = main_jepat.get_args_parser().parse_args(
        NO_EVAL_SMALL
        + FAST_SAMPLING
        + [
            "--output_dir",
            str(ev),
            "--evaluate",
            "--resume",
            str(run / "checkpoint-last.pth"),
            "--eval_class_names",
            str(tmp_path / "classes.txt"),
            "--eval_class_template",
            "a {}",
            *"--num_images 6 --eval_metrics isc --fid_feature_extractor jepat-test-tiny --save_npz".split(),
        ]
    )
    m = main_jepat.main(ns)
    assert m["num_classes"] == 3 and m["images_per_class"] == 2 and m["checkpoint"].endswith("checkpoint-last.pth")
    assert "fid" not in m["fidelity"] and m["fidelity"]["num_samples"] == 6
    assert np.load(ev / "samples_6x16x16x3.npz")["arr_1"].tolist() == [0, 1, 2, 0, 1, 2]
    with pytest.raises(ValueError, match="multiple of the 3 classes"):
        setattr(ns, "set:eval.num_images", 7)  # the flag --num_images 7
        main_jepat.main(ns)

    # --evaluate on shapes: judged accuracy with its sample count, and the linear probe
    sh = tmp_path / "eval_shapes"
    ns = main_jepat.get_args_parser().parse_args(
        NO_EVAL_SMALL
        + FAST_SAMPLING
        + [
            "--output_dir",
            str(sh),
            "--evaluate",
            "--resume",
            str(run / "checkpoint-last.pth"),
            *"--eval_per_combo 1 --probe --probe_train 60 --probe_test 30".split(),
        ]
    )
    m = main_jepat.main(ns)
    saved = json.loads((sh / "metrics.json").read_text())
    assert saved["num_samples"] == 18 + 15  # seen and held-out combinations, then 15 in held-out words
    assert saved["probe"]["num_train"] == 60 and 0 <= saved["probe"]["color_acc"] <= 1
    assert m["probe"] == saved["probe"] and list((sh / "tb").glob("events.*"))
