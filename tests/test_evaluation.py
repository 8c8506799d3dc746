"""Evaluation by generation: prompts per image id, seeds per id, ranks, CLIP score, probe, CLI."""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from models.sampler import SamplingConfig
from models.text_encoders import TextEmbeddings
from models.tokenizers import build_tokenizer
from tests.helpers import TEXT_POOL, TEXT_TOK, S, tiny_model
from util.evaluation import evaluate, generate, prompts
from util.evaluation.generate import ImageGenerator
from util.runtime import DistEnv

SAMPLING = SamplingConfig(num_iter=3, guidance_scale=2.0, temperature=0.9, ode_steps=2, ode_solver="heun")


class HashedTextTable:
    """Caption embeddings that depend only on the caption (what a frozen encoder gives)."""

    def lookup(self, captions):
        rows = []
        for c in captions:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(c)))
            rows.append(
                TextEmbeddings(
                    torch.randn(1, S, TEXT_TOK, generator=g),
                    torch.ones(1, S, dtype=torch.bool),
                    torch.randn(1, TEXT_POOL, generator=g),
                )
            )
        return TextEmbeddings.cat(rows)


PROMPTS = [f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")] * 2 + ["", "a shape"]


def generate_ids(folder: Path, batch_size: int, env: DistEnv = DistEnv()) -> None:
    gen = ImageGenerator(tiny_model(), HashedTextTable(), build_tokenizer("pixels"), SAMPLING, torch.device("cpu"))
    gen.generate_to_folder(PROMPTS, 7, folder, env, batch_size)


def _rank_main(rank: int, world: int, rendezvous: str, folder: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        generate_ids(Path(folder), batch_size=3, env=DistEnv(rank=rank, world_size=world, initialized=True))
    finally:
        torch.distributed.destroy_process_group()


def read(folder: Path) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / generate.image_name(i))) for i in range(len(PROMPTS))])


def test_one_rank_and_two_gloo_ranks_give_the_same_image_for_each_id(tmp_path, one_thread):
    generate_ids(tmp_path / "one", batch_size=3)
    # fork: the children inherit the imports instead of re-importing torch and the models
    mp.start_processes(
        _rank_main, args=(2, str(tmp_path / "rdv"), str(tmp_path / "two")), nprocs=2, join=True, start_method="fork"
    )
    one, two = read(tmp_path / "one"), read(tmp_path / "two")
    assert np.array_equal(one, two)
    assert len({im.tobytes() for im in one}) == len(PROMPTS)  # not all the same picture
    # an image depends on its id, not on the batch it was drawn in
    generate_ids(tmp_path / "other_batch", batch_size=5)
    assert np.abs(read(tmp_path / "other_batch").astype(int) - one.astype(int)).max() <= 1
    # the share of each rank: fixed batches of consecutive ids, dealt round-robin
    assert [list(r) for r in generate.batches_of_rank(14, 3, 1, 2)] == [[3, 4, 5], [9, 10, 11]]


def evaluate_set(out: Path, ref: Path, env: DistEnv = DistEnv()) -> dict:
    from util.evaluation import fid

    gen = ImageGenerator(tiny_model(), HashedTextTable(), build_tokenizer("pixels"), SAMPLING, torch.device("cpu"))
    options = evaluate.EvalOptions(
        prompts=prompts.file_prompts(PROMPTS),
        fid_ref=str(ref),
        metrics=("fid", "isc"),
        feature_extractor=fid.register_test_extractor(),
        batch_size=3,
        save_samples=False,
    )
    return evaluate.evaluate_prompts(gen, options, out, env)


def _evaluation_rank_main(rank: int, world: int, rendezvous: str, out: str, ref: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        metrics = evaluate_set(Path(out), Path(ref), DistEnv(rank=rank, world_size=world, initialized=True))
        assert (metrics == {}) == (rank != 0)
        if rank == 0:
            (Path(out) / "rank0.json").write_text(json.dumps(metrics["fidelity"]))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ranks_compute_the_metrics_of_one(tmp_path, one_thread):
    """Each rank extracts the features of the images it generated, in memory; rank 0 gathers them
    in id order: FID and IS are those of one rank, and no PNG is needed for them."""
    ref = tmp_path / "ref"
    generate.write_pngs(torch.randint(0, 256, (12, 3, 16, 16), dtype=torch.uint8), range(12), ref)
    one = evaluate_set(tmp_path / "one", ref)["fidelity"]
    mp.start_processes(
        _evaluation_rank_main,
        args=(2, str(tmp_path / "rdv"), str(tmp_path / "two"), str(ref)),
        nprocs=2,
        join=True,
        start_method="fork",
    )
    two = json.loads((tmp_path / "two" / "rank0.json").read_text())
    assert one["num_samples"] == two["num_samples"] == len(PROMPTS)
    for key in ("fid", "inception_score_mean", "inception_score_std"):
        assert two[key] == pytest.approx(one[key], abs=1e-4), key
    assert one["fid"] > 0
    assert (tmp_path / "two" / "grid.png").is_file() and not (tmp_path / "two" / "samples").exists()


def test_class_balanced_prompts():
    names = ["tench", "goldfish", "great white shark", "crane", "crane"]  # ImageNet repeats names
    ps = prompts.class_balanced_prompts(names, 20, "a photo of a {}")
    assert len(ps) == 20 and ps.num_classes == 5 and ps.extra["images_per_class"] == 4
    assert Counter(ps.labels) == {k: 4 for k in range(5)}
    assert ps.prompts[2] == "a photo of a great white shark" and ps.labels[:5] == [0, 1, 2, 3, 4]
    assert all(ps.prompts[i] == f"a photo of a {names[ps.labels[i]]}" for i in range(20))
    with pytest.raises(ValueError, match="multiple of the 5 classes"):
        prompts.class_balanced_prompts(names, 12)
    with pytest.raises(ValueError, match="no class names"):
        prompts.class_balanced_prompts([], 10)
    with pytest.raises(ValueError, match="template"):
        prompts.class_balanced_prompts(names, 5, "a photo")
    fp = prompts.file_prompts(["a", "b", "c"], 7)
    assert fp.prompts == ["a", "b", "c", "a", "b", "c", "a"] and len(prompts.file_prompts(["x", "y"])) == 2


def test_image_seeds_differ_by_id_and_by_seed():
    seeds = {generate.image_seed(s, i) for s in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= x < 2**63 for x in seeds)


TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
}


def test_clip_score_with_random_open_clip_weights(tmp_path, one_thread):
    import open_clip

    from util.evaluation import clip_score

    (tmp_path / "jepat-test-clip.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(tmp_path / "jepat-test-clip.json")  # a tiny architecture, random weights
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model, preprocess, tok = clip_score.load_clip("jepat-test-clip", None, cpu)
    images = (torch.rand(4, 3, 16, 16) * 255).to(torch.uint8)
    prompts = ["a red circle", "a blue square", "a green triangle", "a purple square"]
    cos = clip_score.clip_similarity(model, preprocess, tok, images, prompts, cpu)
    s = clip_score.clip_scores(model, preprocess, tok, images, prompts, cpu)
    assert s.shape == (4,) and torch.allclose(s, 100 * cos.clamp(min=0))
    # image i is paired with prompt i: reversing the prompts changes every similarity
    assert not torch.isclose(cos, clip_score.clip_similarity(model, preprocess, tok, images, prompts[::-1], cpu)).any()
    out = clip_score.clip_score(images, prompts, "jepat-test-clip", None, cpu)
    assert out["num_samples"] == 4 and 0 <= out["clip_score"] <= 100
    with pytest.raises(FileNotFoundError, match="no CLIP weights at .*missing.pt"):
        clip_score.load_clip("jepat-test-clip", str(tmp_path / "missing.pt"), cpu)
    with pytest.raises(ValueError, match="images but"):
        clip_score.clip_scores(model, preprocess, tok, images, prompts[:2], cpu)


def test_linear_probe_learns_colors_from_pixels_and_reads_the_encoder(one_thread):
    from util.evaluation import probe

    model = tiny_model()
    tokenizer = build_tokenizer("pixels")
    out = probe.probe_shapes(
        model, tokenizer, patch_size=2, img_size=8, device=torch.device("cpu"), num_train=120, num_test=60, seed=0
    )
    for key in ("color_acc", "shape_acc"):
        for r in (out, out["random_init_encoder"], out["raw_pixels"]):
            assert 0.0 <= r[key] <= 1.0
    assert out["raw_pixels"]["color_acc"] > 0.6  # chance is 1/6: the probe itself works on pixels
    feats = probe.encoder_features(model, tokenizer, 2, torch.zeros(4, 3, 8, 8), torch.device("cpu"))
    assert feats.shape == (4, model.cfg.width)
    with pytest.raises(ValueError, match="img_size"):
        probe.encoder_features(model, tokenizer, 2, torch.zeros(1, 3, 16, 16), torch.device("cpu"))


def test_missing_weights_and_references_fail_before_generating(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="no Inception weights at .*hub"):
        evaluate.check_options(evaluate.EvalOptions(fid_ref=str(tmp_path)))
    tiny = "jepat-test-tiny"
    with pytest.raises(FileNotFoundError, match="no FID reference at .*nothing.npz"):
        evaluate.check_options(evaluate.EvalOptions(fid_ref=str(tmp_path / "nothing.npz"), feature_extractor=tiny))
    with pytest.raises(FileNotFoundError, match="no CLIP weights at .*clip.bin"):
        evaluate.check_options(
            evaluate.EvalOptions(feature_extractor=tiny, clip_score_weights=str(tmp_path / "clip.bin"))
        )
    # without a reference only the Inception Score remains (and metrics.json says what was skipped)
    assert evaluate.check_options(evaluate.EvalOptions(feature_extractor=tiny)) == ["isc"]
