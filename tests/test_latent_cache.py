"""The latent cache end to end on the CPU: a tiny ImageNet-style folder and a caption manifest
written here (with every kind of bad input), MAR's KL-16 architecture with random weights at
16 px, one process against two gloo ranks, resume after an interruption, the training loader,
and the refusal of a mismatched cache."""

import io
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image
from torch.utils.data import DataLoader

import main_cache
from tests.helpers import fork_server, in_environ
from util.data.datasets import DataOrder
from util.data.draws import ItemKey, draw_seed
from util.data.latent_cache import CachedLatentDataset, read_meta

GOOD = {"n01440764/good1.jpg", "n01440764/good2.png", "n01440764/good3.JPEG"}
CONVERTED = {
    "n01443537/cmyk.jpg": "CMYK",
    "n01443537/gray.png": "L converted",
    "n01443537/alpha.png": "alpha",
    "n01443537/deep.png": "16-bit",
}
SKIPPED = {
    "my_class/small.png": "smaller than the crop",
    "my_class/corrupt.jpg": "not a readable image",
    "my_class/truncated.jpg": "truncated",
    "my_class/notes.txt": "not an image file",
}


def _rgb(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def write_class_folders(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for d in ("n01440764", "n01443537", "my_class"):
        (root / "train" / d).mkdir(parents=True)
    t = root / "train"
    _rgb(rng, 48, 40).save(t / "n01440764/good1.jpg")
    _rgb(rng, 40, 64).save(t / "n01440764/good2.png")
    _rgb(rng, 70, 50).save(t / "n01440764/good3.JPEG", format="JPEG")
    _rgb(rng, 48, 40).convert("CMYK").save(t / "n01443537/cmyk.jpg")
    _rgb(rng, 40, 40).convert("L").save(t / "n01443537/gray.png")
    rgba = _rgb(rng, 40, 36).convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (36, 40), dtype=np.uint8)))
    rgba.save(t / "n01443537/alpha.png")
    Image.fromarray(rng.integers(0, 65535, (40, 40)).astype(np.uint16)).save(t / "n01443537/deep.png")
    _rgb(rng, 12, 10).save(t / "my_class/small.png")
    (t / "my_class/corrupt.jpg").write_bytes(rng.bytes(600))
    buf = io.BytesIO()
    _rgb(rng, 64, 64).save(buf, format="JPEG")
    (t / "my_class/truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (t / "my_class/notes.txt").write_text("not an image")
    return root


def cache_args(data: Path, cache: Path, *extra: str):
    return main_cache.get_args_parser().parse_args(
        [
            "--dataset",
            "imagenet",
            "--data_path",
            str(data),
            *"--img_size 16 --tokenizer kl16 --cache_dir".split(),
            str(cache),
            *"--shard_size 3 --batch_size 2 --num_workers 0 --small_images skip --no_text_cache --device cpu".split(),
            *extra,
        ]
    )


def _rank(rank: int, world: int, port: int, argv) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    main_cache.main(main_cache.get_args_parser().parse_args(argv))


def run_cache_ranks(argv: list[str], world: int = 2) -> None:
    """``main_cache.py argv`` on ``world`` gloo ranks forked from the preloaded fork server, each with
    the environment a spawned rank would get."""
    fork_server()  # preloads the server that start_method="forkserver" forks the ranks from
    args = (dict(os.environ), _rank, world, _free_port(), argv)
    mp.start_processes(in_environ, args=args, nprocs=world, join=True, start_method="forkserver")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shard_arrays(cache: Path):
    return {p.name: np.load(p) for p in sorted((cache / "shards").glob("*.npy"))}


def assert_same_shards(one, two) -> None:
    """States, groups and index equal; moments equal up to float summation order (another
    process may split a convolution's reductions across threads differently)."""
    assert one.keys() == two.keys()
    for k in one:
        if k.endswith((".state.npy", ".group.npy")):
            assert np.array_equal(one[k], two[k]), k
        else:
            assert np.allclose(one[k], two[k], rtol=1e-5, atol=1e-6), (k, np.abs(one[k] - two[k]).max())


def read_jsonl(path: Path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("imagenet"))


@pytest.fixture(scope="module")
def single(folder, kl16_ckpt, tmp_path_factory):
    cache = tmp_path_factory.mktemp("single") / "cache"
    counts = main_cache.main(cache_args(folder, cache, "--vae_path", str(kl16_ckpt)))
    return cache, counts


def test_bad_input_is_converted_or_skipped_and_counted(single, kl16_random):
    cache, counts = single
    assert counts == {"seen": 11, "cached": 7, "skipped": 4, "converted": 4, "pending": 0}
    assert counts["seen"] == counts["cached"] + counts["skipped"]
    skipped = {r["path"]: r["reason"] for r in read_jsonl(cache / "skipped.jsonl")}
    assert skipped.keys() == SKIPPED.keys()
    for path, why in SKIPPED.items():
        assert why in skipped[path], (path, skipped[path])
    converted = {r["path"]: r["note"] for r in read_jsonl(cache / "converted.jsonl")}
    assert converted.keys() == CONVERTED.keys()
    for path, why in CONVERTED.items():
        assert why in converted[path], (path, converted[path])
    meta = read_meta(cache)
    assert (meta["tokenizer"], meta["resolution"], meta["scaling"], meta["complete"]) == ("kl16", 16, 0.2325, True)
    index = np.load(cache / "index.npy")
    paths = {p.decode() for p in index["path"]}
    assert paths == GOOD | CONVERTED.keys()
    assert dict(zip((p.decode() for p in index["path"]), index["group"].tolist()))["n01443537/gray.png"] == 2
    listing = json.loads((cache / "listing.json").read_text())
    # sorted class folders; synsets get their ImageNet name, other folders keep their own
    assert listing["groups"] == [["a photo of a my class"], ["a photo of a tench"], ["a photo of a goldfish"]]
    # the stored moments are those of the crop and of its mirror image
    from util.data.image_folders import load_image, to_tensor

    ds = CachedLatentDataset(cache)
    i = [p.decode() for p in index["path"]].index("n01440764/good2.png")
    img, _ = load_image(os.path.join(listing["root"], "n01440764/good2.png"), 16)
    x = to_tensor(img)[None]
    both = torch.from_numpy(ds.moments(i).copy())  # [2,32,1,1]
    assert torch.allclose(both[0], kl16_random.moments(x)[0], atol=1e-5)
    assert torch.allclose(both[1], kl16_random.moments(x.flip(-1))[0], atol=1e-5)
    assert not torch.allclose(both[0], both[1])


def test_two_gloo_ranks_write_the_same_cache(single, folder, kl16_ckpt, tmp_path):
    cache = tmp_path / "two"
    argv = [
        "--dataset",
        "imagenet",
        "--data_path",
        str(folder),
        *"--img_size 16 --tokenizer kl16 --vae_path".split(),
        str(kl16_ckpt),
        "--cache_dir",
        str(cache),
        *"--shard_size 3 --batch_size 2 --num_workers 0 --small_images skip --no_text_cache --device cpu".split(),
    ]
    run_cache_ranks(argv)
    one, two = shard_arrays(single[0]), shard_arrays(cache)
    assert one.keys() == two.keys() and len([k for k in one if k.endswith(".state.npy")]) == 4
    assert_same_shards(one, two)
    assert np.array_equal(np.load(single[0] / "index.npy"), np.load(cache / "index.npy"))
    assert (cache / "skipped.jsonl").read_text() == (single[0] / "skipped.jsonl").read_text()


def test_resume_after_an_interruption_finishes_without_duplicates(single, folder, kl16_ckpt, tmp_path):
    cache = tmp_path / "resumed"
    counts = main_cache.main(cache_args(folder, cache, "--vae_path", str(kl16_ckpt), "--max_batches", "2"))
    assert counts["pending"] > 0 and counts["seen"] == counts["cached"] + counts["skipped"] + counts["pending"]
    with pytest.raises(ValueError, match="incomplete.*rerun main_cache.py"):
        CachedLatentDataset(cache)
    # a kill between writing a row's moments and its state byte: the row is simply done again
    state = np.load(cache / "shards" / "shard-00000.state.npy", mmap_mode="r+")
    assert state.all()
    state[:] = 0
    state.flush()
    with pytest.raises(ValueError, match="other settings.*img_size|resolution: 16 there vs 64 now"):
        main_cache.main(cache_args(folder, cache, "--vae_path", str(kl16_ckpt), "--img_size", "64"))
    counts = main_cache.main(cache_args(folder, cache, "--vae_path", str(kl16_ckpt)))
    assert counts == single[1]
    assert_same_shards(shard_arrays(single[0]), shard_arrays(cache))
    assert np.array_equal(np.load(single[0] / "index.npy"), np.load(cache / "index.npy"))
    skipped = read_jsonl(cache / "skipped.jsonl")
    assert len(skipped) == len({r["path"] for r in skipped}) == 4


def test_loader_samples_plain_or_flipped_latents_and_refuses_a_mismatch(single):
    cache, _ = single
    ds = CachedLatentDataset(cache)
    assert len(ds) == 7 and len(ds.caption_vocabulary()) == 3
    m = torch.from_numpy(ds.moments(0).copy())  # [2,32,1,1]
    mean, std = m[:, :16], torch.exp(0.5 * m[:, 16:].clamp(-30, 20))
    sides = set()
    for epoch in range(24):  # item 0 in 24 epochs: its own draws each time
        z, caption = ds[ItemKey(0, draw_seed(0, epoch, 0))]
        assert z.shape == (16, 1, 1) and caption == "a photo of a tench"
        noise = (z / 0.2325 - mean) / std  # [2,16,1,1]: one is N(0,1)
        side = int(noise[1].abs().max() < noise[0].abs().max())
        assert noise[side].abs().max() < 6
        sides.add(side)
    assert sides == {0, 1}
    a, _ = ds[ItemKey(0, 1)]
    assert torch.equal(a, ds[ItemKey(0, 1)][0]) and not torch.equal(a, ds[ItemKey(0, 2)][0])  # sampled by its key
    with pytest.raises(ValueError, match=r"made with tokenizer 'kl16' at 16 px.*--tokenizer sd-vae --img_size 16"):
        ds.check("sd-vae", 16)
    with pytest.raises(ValueError, match=r"--img_size 32.*pass --tokenizer kl16 --img_size 16"):
        ds.check("kl16", 32)
    ds.check("kl16", 16)


def test_draws_are_a_function_of_seed_epoch_and_index_whatever_the_workers_and_ranks(single):
    """Flips, posterior noise and caption choice come from each item's key: the same with 0 or 2
    loader workers, restored by a resume mid-epoch, shared by any world size, new each epoch, and
    different on two ranks (not the same worker seeds on every rank)."""
    cache, _ = single
    ds = CachedLatentDataset(cache)

    def batches(order: DataOrder, workers: int):
        loader = DataLoader(ds, batch_size=1, sampler=order, num_workers=workers)
        return [z.clone() for z, _ in loader]

    def same(a, b):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))

    whole = batches(DataOrder(7, 1, seed=5), 0)
    assert same(whole, batches(DataOrder(7, 1, seed=5), 2))
    resumed = DataOrder(7, 1, seed=5)
    resumed.set_position(0, 3)
    assert same(whole[3:], batches(resumed, 2))
    ranks = [DataOrder(7, 1, seed=5, rank=r, world_size=2) for r in (0, 1)]
    r0, r1 = batches(ranks[0], 2), batches(ranks[1], 0)
    assert same(r0, whole[0:6:2]) and same(r1, whole[1:6:2])  # two ranks = one process, item for item
    assert {k.seed for k in ranks[0]}.isdisjoint(k.seed for k in ranks[1])
    later = DataOrder(7, 1, seed=5)
    later.set_epoch(1)
    index_of = {k.index: j for j, k in enumerate(DataOrder(7, 1, seed=5))}
    anew = batches(later, 0)
    assert all(not torch.equal(z, whole[index_of[k.index]]) for z, k in zip(anew, later))
