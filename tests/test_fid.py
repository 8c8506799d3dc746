"""FID / IS / precision-recall / KID through torch-fidelity with a small registered extractor (CPU, offline)."""

import numpy as np
import pytest
import torch
import torch_fidelity
from torchvision.utils import save_image

from util.data import shapes
from util.evaluation import fid


def shapes_uint8(n: int, seed: int, res: int = 16) -> torch.Tensor:
    ds = shapes.ShapesDataset(split="all", num_samples=n, resolution=res, seed=seed)
    return torch.stack([torch.from_numpy(ds.image(i)).permute(2, 0, 1) for i in range(n)])  # [N,3,H,W]


def write_folder(images: torch.Tensor, folder) -> None:
    folder.mkdir()
    for i, im in enumerate(images):
        save_image(im.float() / 255, folder / f"{i:04d}.png")


@pytest.fixture(scope="module")
def sets():
    return {"a": shapes_uint8(96, seed=1), "b": shapes_uint8(96, seed=2)}


def test_fid_of_a_set_against_itself_is_zero_and_a_shifted_set_is_far(sets):
    name = fid.register_test_extractor()
    a, b = sets["a"], sets["b"]
    shifted = (a.float() * 0.6).to(torch.uint8)  # darker: another distribution
    feats = {
        k: fid.extract_features(v, name, ["pool"], torch.device("cpu"))["pool"]
        for k, v in {"a": a, "b": b, "shifted": shifted}.items()
    }
    stats = {k: fid.statistics(v) for k, v in feats.items()}
    self_fid = fid.frechet_distance(stats["a"], stats["a"])
    same_dist = fid.frechet_distance(stats["a"], stats["b"])  # two draws of the same distribution
    far = fid.frechet_distance(stats["a"], stats["shifted"])
    assert abs(self_fid) < 1e-3, self_fid
    assert far > 5 * same_dist and far > 0.05, (same_dist, far)


def test_statistics_file_fid_equals_torch_fidelity_two_folder_fid(sets, tmp_path):
    name = fid.register_test_extractor()
    write_folder(sets["a"], tmp_path / "gen")
    write_folder(sets["b"], tmp_path / "ref")
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "gen"),
        input2=str(tmp_path / "ref"),
        fid=True,
        feature_extractor=name,
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )["frechet_inception_distance"]
    ref_feats = fid.extract_features(tmp_path / "ref", name, ["pool"], torch.device("cpu"))["pool"]
    fid.save_statistics(tmp_path / "ref_stats.npz", ref_feats, name)
    from_stats = fid.compute_metrics(tmp_path / "gen", tmp_path / "ref_stats.npz", ("fid", "isc", "prc"), name)
    from_folder = fid.compute_metrics(tmp_path / "gen", tmp_path / "ref", ("fid", "isc", "prc", "kid"), name)
    assert theirs > 0.01
    assert abs(from_stats["fid"] - theirs) < 1e-3 and abs(from_folder["fid"] - theirs) < 1e-3, (from_stats, theirs)
    # every result carries its sample count; fewer than 50K samples is said
    assert from_stats["num_samples"] == 96 and from_stats["reference_num_samples"] == 96
    assert from_stats["fid_label"] == "FID-96" and "fewer than 50000" in from_stats["fid_note"]
    # precision/recall need reference images: skipped (and said) for a statistics file, computed for a folder
    assert "precision" not in from_stats and "prc" in from_stats["skipped"]
    assert 0 <= from_folder["precision"] <= 1 and 0 <= from_folder["recall"] <= 1 and "kid_mean" in from_folder
    assert from_folder["inception_score_mean"] == pytest.approx(from_stats["inception_score_mean"])
    assert "FID-96" in fid.describe(from_folder) and "96 samples" in fid.describe(from_folder)
    with pytest.raises(ValueError, match="need a reference"):
        fid.compute_metrics(tmp_path / "gen", None, ("fid",), name)


def test_adm_reference_batch_with_images_gives_precision_recall(sets, tmp_path):
    name = fid.register_test_extractor()
    feats = fid.extract_features(sets["b"], name, ["pool"], torch.device("cpu"))["pool"]
    s = fid.statistics(feats)
    np.savez(tmp_path / "adm.npz", arr_0=sets["b"].permute(0, 2, 3, 1).numpy(), mu=s["mu"], sigma=s["sigma"])
    out = fid.compute_metrics(sets["a"], tmp_path / "adm.npz", ("fid", "prc"), name)
    assert "precision" in out and out["reference_num_samples"] == 96
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.compute_metrics(sets["a"], tmp_path / "bad.npz", ("fid",), name)


def test_missing_inception_weights_is_an_error_naming_the_path(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    expected = tmp_path / "hub" / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert fid.inception_weights_path() == expected
    with pytest.raises(FileNotFoundError, match=str(expected)):
        fid.extractor_kwargs(fid.INCEPTION)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fid.extractor_kwargs(fid.INCEPTION, str(tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="unknown feature extractor"):
        fid.extractor_kwargs("inception-v9")


def test_sample_count_labels():
    assert fid.sample_count_label(50_000) == "50K" and fid.sample_count_label(1000) == "1K"
    assert fid.sample_count_label(1234) == "1234" and fid.sample_count_label(10) == "10"
