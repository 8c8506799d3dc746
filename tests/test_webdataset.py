"""WebDataset tar shards end to end on the CPU: tiny shards in img2dataset's layout written here by
webdataset's own TarWriter (with every kind of bad sample and a truncated last shard), their
listing, caching from a brace pattern, from a folder and on two gloo ranks, raw training, and
training from their cache (pixels tokenizer, so every tensor can be checked exactly)."""

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import main_cache
import main_jepat
from engine_jepat import ModelInputs
from tests.test_latent_cache import read_jsonl, run_cache_ranks, shard_arrays
from util.data.datasets import build_dataset
from util.data.image_folders import load_image, to_tensor
from util.data.latent_cache import CachedLatentDataset
from util.data.tar_shards import list_tar_shards, scan_tar
from util.training.checkpoint import checkpoint_recipe

# usable samples: image member -> caption
GOOD = {
    "00000.tar/000000000.jpg": "a red kite over a beach",
    "00000.tar/000000001.png": "a glass of water",
    "00001.tar/000010000.webp": "a cat on a sofa",
    "00001.tar/000010003.jpg": "a tiny icon",
    "00002.tar/000020000.jpg": "two dogs in the snow",
    "00002.tar/000020001.JPG": "a lighthouse at night",
}
CORRUPT = {"00000.tar/000000002.jpg": "a broken file"}  # listed, then refused when decoded
CONVERTED = {"00000.tar/000000001.png": "alpha", "00001.tar/000010003.jpg": "upscaled"}
REFUSED = {
    "00000.tar/000000003": "no image member (has .json)",
    "00000.tar/000000004": "empty or missing caption (no .txt member)",
    "00001.tar/000010001": "empty or missing caption (empty .txt)",
    "00001.tar/000010002": "no image member (has .json, .mp4, .txt)",
    "00002.tar/000020002": "truncated or damaged tar: the file ends inside member 000020002.jpg; this sample "
    "may be incomplete and later ones are lost",
    "00003.tar": "not a readable tar (damaged header (bad checksum) at byte 0)",
}
SIZE = 16


def _image(rng, w: int, h: int, fmt: str, mode: str = "RGB") -> bytes:
    img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    if mode == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def write_shards(root: Path) -> dict:
    """Four shards as img2dataset writes them (jpg/txt/json per key, and its parquet and stats
    files beside them); returns every image member's bytes by listing path."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    images = {
        "00000.tar/000000000.jpg": _image(rng, 24, 20, "JPEG"),
        "00000.tar/000000001.png": _image(rng, 20, 20, "PNG", "RGBA"),
        "00000.tar/000000002.jpg": b"<html>404 not found</html>",
        "00001.tar/000010000.webp": _image(rng, 20, 24, "WEBP"),
        "00001.tar/000010003.jpg": _image(rng, 8, 8, "JPEG"),
        "00002.tar/000020000.jpg": _image(rng, 20, 20, "JPEG"),
        "00002.tar/000020001.JPG": _image(rng, 32, 20, "JPEG"),
        "00002.tar/000020002.jpg": _image(rng, 64, 64, "JPEG"),
    }
    captions = {**GOOD, **CORRUPT, "00002.tar/000020002.jpg": "cut off"}
    samples = {"00000.tar": [], "00001.tar": [], "00002.tar": []}
    for path, data in images.items():
        shard, name = path.split("/")
        key, ext = name.split(".")
        samples[shard].append({"__key__": key, ext: data, "txt": captions[path], "json": {"key": key}})
    samples["00000.tar"] += [
        {"__key__": "000000003", "json": {"key": "000000003", "status": "success"}},
        {"__key__": "000000004", "jpg": images["00000.tar/000000000.jpg"], "json": {}},
    ]
    samples["00001.tar"].insert(
        1, {"__key__": "000010001", "jpg": images["00000.tar/000000000.jpg"], "txt": "   ", "json": {}}
    )
    samples["00001.tar"].insert(
        2, {"__key__": "000010002", "mp4": b"\x00\x00\x00\x18ftypmp42", "txt": "a video", "json": {}}
    )
    for shard, items in samples.items():
        with wds.TarWriter(str(root / shard)) as writer:
            for sample in sorted(items, key=lambda s: s["__key__"]):
                writer.write(sample)
        (root / shard.replace(".tar", ".parquet")).write_bytes(b"PAR1")
        (root / shard.replace(".tar", "_stats.json")).write_text("{}")
    last = root / "00002.tar"
    with tarfile.open(last) as tf:
        cut = next(m for m in tf.getmembers() if m.name == "000020002.jpg")
    os.truncate(last, cut.offset_data + cut.size // 2)  # a copy that stopped half-way
    (root / "00003.tar").write_bytes(b"this is not a tar archive\n" * 40)
    return images


def expected_image(data: bytes) -> torch.Tensor:
    img, _ = load_image(io.BytesIO(data), SIZE)
    return to_tensor(img)


def cache_argv(data_path: str, cache: Path, *extra: str):
    return [
        "--dataset",
        "webdataset",
        "--data_path",
        data_path,
        "--tokenizer",
        "pixels",
        "--img_size",
        str(SIZE),
        "--cache_dir",
        str(cache),
        *"--shard_size 3 --batch_size 2 --num_workers 0 --no_text_cache --device cpu".split(),
        *extra,
    ]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds") / "cc"
    return root, write_shards(root)


@pytest.fixture(scope="module")
def single(shards, tmp_path_factory):
    cache = tmp_path_factory.mktemp("single") / "cache"
    counts = main_cache.main(
        main_cache.get_args_parser().parse_args(cache_argv(f"{shards[0]}/{{00000..00003}}.tar", cache))
    )
    return cache, counts


def test_listing_reads_the_headers_and_refuses_bad_samples(shards):
    root, images = shards
    listing = list_tar_shards(f"{root}/{{00000..00003}}.tar")
    assert listing.root == str(root) and listing.kind == "caption"
    assert listing.paths == sorted({**GOOD, **CORRUPT})
    assert [listing.captions[g] for g in listing.groups] == [[{**GOOD, **CORRUPT}[p]] for p in listing.paths]
    assert {r["path"]: r["reason"] for r in listing.skipped} == REFUSED
    for i, path in enumerate(listing.paths):  # one seek reads the member's bytes
        assert listing.image_file(i).read() == images[path], path
    # the header scan agrees with tarfile on whole shards, and names where a cut one ends
    for shard in ("00000.tar", "00001.tar"):
        with tarfile.open(root / shard) as tf:
            assert scan_tar((root / shard).read_bytes()) == ([(m.name, m.offset_data, m.size) for m in tf], None)
    members, stop = scan_tar((root / "00002.tar").read_bytes())
    assert members[-1][0] == "000020002.jpg" and stop == "the file ends inside member 000020002.jpg"
    # a folder lists the same (its parquet and stats files are not shards); a missing shard is recorded
    folder = list_tar_shards(str(root))
    assert (folder.root, folder.paths, folder.captions, folder.skipped) == (
        listing.root,
        listing.paths,
        listing.captions,
        listing.skipped,
    )
    assert np.array_equal(folder.members.where, listing.members.where)
    more = list_tar_shards(f"{root}/{{00000..00004}}.tar")
    assert more.paths == listing.paths and more.skipped[-1] == {"path": "00004.tar", "reason": "tar shard is missing"}
    with pytest.raises(FileNotFoundError, match="no tar shard matches.*brace pattern"):
        list_tar_shards(f"{root}/{{00005..00009}}.tar")
    with pytest.raises(FileNotFoundError, match="no .tar files in"):
        list_tar_shards(str(root.parent))
    with pytest.raises(ValueError, match="not a local path"):
        list_tar_shards("s3://bucket/cc3m/{00000..00331}.tar")


def test_cache_counts_every_sample_and_matches_the_images(single, shards):
    cache, counts = single
    assert counts == {"seen": 13, "cached": 6, "skipped": 7, "converted": 2, "pending": 0}
    assert counts["seen"] == counts["cached"] + counts["skipped"]
    skipped = {r["path"]: (r["stage"], r["reason"]) for r in read_jsonl(cache / "skipped.jsonl")}
    assert skipped.keys() == REFUSED.keys() | CORRUPT.keys()
    assert all(skipped[p] == ("listing", why) for p, why in REFUSED.items())
    assert (
        skipped["00000.tar/000000002.jpg"][0] == "load"
        and "not a readable image" in skipped["00000.tar/000000002.jpg"][1]
    )
    converted = {r["path"]: r["note"] for r in read_jsonl(cache / "converted.jsonl")}
    assert converted.keys() == CONVERTED.keys() and all(w in converted[p] for p, w in CONVERTED.items())
    ds = CachedLatentDataset(cache)
    assert ds.flip is False and json.loads((cache / "meta.json").read_text())["flipped"] is False  # captions: no flips
    paths = [p.decode() for p in ds.index["path"]]
    assert sorted(paths) == sorted(GOOD)
    for i, path in enumerate(paths):  # pixels: the moments are the crops
        assert torch.equal(torch.from_numpy(np.array(ds.moments(i)[0])), expected_image(shards[1][path])), path
        assert ds[i][1] == GOOD[path]  # its one caption


def test_a_folder_and_a_brace_pattern_give_the_same_cache(single, shards, tmp_path):
    cache = tmp_path / "folder"
    counts = main_cache.main(main_cache.get_args_parser().parse_args(cache_argv(str(shards[0]), cache)))
    assert counts == single[1]
    one, two = shard_arrays(single[0]), shard_arrays(cache)
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    assert np.array_equal(np.load(single[0] / "index.npy"), np.load(cache / "index.npy"))
    for name in ("listing.json", "skipped.jsonl", "converted.jsonl"):
        assert (cache / name).read_text() == (single[0] / name).read_text(), name
    assert (
        json.loads((cache / "meta.json").read_text())["listing_digest"]
        == json.loads((single[0] / "meta.json").read_text())["listing_digest"]
    )


def test_two_gloo_ranks_write_the_same_cache(single, shards, tmp_path):
    cache = tmp_path / "two"
    argv = cache_argv(f"{shards[0]}/{{00000..00003}}.tar", cache)
    run_cache_ranks(argv)
    one, two = shard_arrays(single[0]), shard_arrays(cache)
    assert len([k for k in two if k.endswith(".state.npy")]) == 3  # 7 listed entries in shards of 3
    assert one.keys() == two.keys() and all(np.array_equal(one[k], two[k]) for k in one)
    assert np.array_equal(np.load(single[0] / "index.npy"), np.load(cache / "index.npy"))
    assert (cache / "skipped.jsonl").read_text() == (single[0] / "skipped.jsonl").read_text()


class BatchSpy:
    """Records every (image, caption) pair the training step receives."""

    def __init__(self, monkeypatch) -> None:
        self.pairs, original = [], ModelInputs.__call__

        def spy(inputs, images, captions):
            self.pairs += list(zip(images.clone(), captions))
            return original(inputs, images, captions)

        monkeypatch.setattr(ModelInputs, "__call__", spy)


def train(tmp_path: Path, dataset: str, data_path: str) -> dict:
    return main_jepat.main(
        main_jepat.get_args_parser().parse_args(
            [
                "--dataset",
                dataset,
                "--data_path",
                data_path,
                "--tokenizer",
                "pixels",
                "--img_size",
                str(SIZE),
                *(
                    "--patch_size 8 --batch_size 2 --epochs 1 --max_steps 2 --no_eval --grid_freq 0 "
                    "--num_workers 0 --precision fp32 --device cpu --log_freq 1 --output_dir"
                ).split(),
                str(tmp_path),
            ]
        )
    )


def assert_pairs_are_the_shards(pairs, images) -> None:
    """Every image is the decoded tar image whose .txt is its caption (unflipped)."""
    by_caption = {c: expected_image(images[p]) for p, c in GOOD.items()}
    assert len(pairs) == 4 and len({c for _, c in pairs}) >= 2
    for image, caption in pairs:
        assert caption in by_caption, caption
        assert torch.equal(image, by_caption[caption]), caption


def test_raw_training_reads_the_shards(shards, tmp_path, monkeypatch, one_thread):
    root, images = shards
    ds = build_dataset("webdataset", f"{root}/{{00000..00003}}.tar", img_size=SIZE)
    assert len(ds) == 7 and ds.flip is False  # caption data: no flips by default
    spy = BatchSpy(monkeypatch)
    out = train(tmp_path / "raw", "webdataset", f"{root}/{{00000..00003}}.tar")
    assert out["step"] == 2
    assert_pairs_are_the_shards(spy.pairs, images)
    ckpt = torch.load(tmp_path / "raw" / "checkpoint-last.pth", weights_only=True)
    captions = checkpoint_recipe(ckpt)["captions"]
    assert captions["dataset"] == "webdataset" and captions["source"] == {"kind": "caption"}


def test_training_from_the_cache_uses_the_captions(single, shards, tmp_path, monkeypatch, one_thread):
    spy = BatchSpy(monkeypatch)
    out = train(tmp_path / "cached", "cached", str(single[0]))
    assert out["step"] == 2
    assert_pairs_are_the_shards(spy.pairs, shards[1])  # pixels: the latents are the crops
    listing = json.loads((single[0] / "listing.json").read_text())  # every caption of the shards, once
    assert set(listing["vocabulary"]) == set(GOOD.values()) | set(CORRUPT.values())
