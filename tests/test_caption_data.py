"""Caption manifests (raw and cached), shapes through the cache pipeline, and training from a
cache whose caption embeddings are stored beside the latents (the text encoder is never built)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import main_cache
import main_jepat
from models.text_encoders import TextEmbeddings, TextEncoder
from util.data.datasets import build_dataset
from util.data.image_folders import imagenet_class_names
from util.data.latent_cache import CachedLatentDataset
from util.data import captions as captions_module
from util.data.captions import CaptionStore, load_text_cache, save_text_cache, text_cache_key


def write_manifest(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True)
    for name, (h, w) in (("a", (20, 24)), ("b", (10, 12)), ("c", (20, 20))):   # b: smaller than the crop
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(root / "img/cmyk.jpg")
    lines = [
        {"image": "img/a.png", "caption": "a red kite over a beach"},
        {"image": "img/b.png", "caption": ["two dogs", "", "a pair of dogs"]},   # one of the non-empty ones per step
        {"image": "img/cmyk.jpg", "caption": "a print"},
        {"image": "img/missing.png", "caption": "not there"},
        {"image": "img/c.png", "caption": "   "},
        {"image": "img/c.png", "caption": [""]},
        {"image": "img/a.png", "caption": "listed twice"},
        {"caption": "no image"},
    ]
    text = "\n".join(json.dumps(line) for line in lines) + "\n{not json\n"
    (root / "captions.jsonl").write_text(text)
    return root / "captions.jsonl"


def test_manifest_raw_and_cached(tmp_path):
    manifest = write_manifest(tmp_path / "data")
    raw = build_dataset("captions", str(manifest), img_size=16)
    assert len(raw) == 3 and sorted(raw.caption_vocabulary()) == sorted(
        ["a red kite over a beach", "two dogs", "a pair of dogs", "a print"])
    torch.manual_seed(0)
    seen = {raw[1][1] for _ in range(30)}
    assert seen == {"two dogs", "a pair of dogs"}
    assert raw[0][0].shape == (3, 16, 16) and -1 <= raw[0][0].min() and raw[0][0].max() <= 1

    cache = tmp_path / "cache"
    counts = main_cache.main(main_cache.get_args_parser().parse_args(
        ["--dataset", "captions", "--data_path", str(manifest), "--tokenizer", "pixels", "--img_size", "16",
         "--cache_dir", str(cache), "--batch_size", "2", "--num_workers", "0", "--no_text_cache", "--device", "cpu"]))
    assert counts == {"seen": 9, "cached": 3, "skipped": 6, "converted": 2, "pending": 0}
    reasons = [json.loads(line)["reason"] for line in (cache / "skipped.jsonl").read_text().splitlines()]
    for why in ("missing", "empty or missing caption", "empty or missing caption", "duplicate path",
                "no \"image\" path", "not JSON"):
        assert sum(why in r for r in reasons) >= 1, (why, reasons)
    notes = [json.loads(line)["note"] for line in (cache / "converted.jsonl").read_text().splitlines()]
    assert sorted(n.split(" ")[0] for n in notes) == ["CMYK", "upscaled"], notes   # --small_images upscale
    ds = CachedLatentDataset(cache)
    ds.check("pixels", 16)
    i = [p.decode() for p in ds.index["path"]].index("img/a.png")
    plain = torch.from_numpy(np.array(ds.moments(i)[0]))
    assert torch.equal(torch.from_numpy(np.array(ds.moments(i)[1])), plain.flip(-1))
    torch.manual_seed(0)
    got = [ds[i][0] for _ in range(20)]
    assert all(g.shape == (3, 16, 16) for g in got)
    flips = [bool(torch.equal(g, plain.flip(-1))) for g in got]
    assert all(torch.equal(g, plain) or f for g, f in zip(got, flips)) and 0 < sum(flips) < 20


def test_imagenet_class_names_file():
    names = imagenet_class_names()
    assert len(names) == 1000 and len(set(names.values())) == 1000
    assert names["n01440764"] == "tench" and names["n15075141"] == "toilet tissue"
    assert list(names) == sorted(names)


class StubEncoder(TextEncoder):
    """Deterministic embeddings without weights to load; records whether it ran."""
    name, token_dim, pooled_dim, max_length = "minilm", 10, 8, 16

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def _encode(self, prompts):
        g = torch.Generator().manual_seed(len(prompts))
        mask = torch.zeros(len(prompts), self.max_length, dtype=torch.bool)
        mask[:, :4] = True
        return TextEmbeddings(torch.randn(len(prompts), self.max_length, self.token_dim, generator=g), mask,
                              torch.randn(len(prompts), self.pooled_dim, generator=g))


def test_training_from_a_shapes_cache_never_builds_the_text_encoder(tmp_path, monkeypatch):
    cache = tmp_path / "shapes"
    counts = main_cache.main(main_cache.get_args_parser().parse_args(
        ["--dataset", "shapes", "--num_samples", "40", "--tokenizer", "pixels", "--img_size", "16",
         "--cache_dir", str(cache), "--shard_size", "16", "--batch_size", "8", "--num_workers", "0",
         "--no_text_cache", "--device", "cpu"]))
    assert counts["cached"] == 40 and counts["seen"] == 40
    ds = CachedLatentDataset(cache)
    table = CaptionStore(StubEncoder())
    table.add(ds.caption_vocabulary())
    key = text_cache_key("minilm", 16)
    save_text_cache(cache / "text" / key, table)
    loaded = load_text_cache(cache / "text" / key)
    assert loaded.encoder is None and loaded.info == {"name": "minilm", "token_dim": 10, "pooled_dim": 8, "max_length": 16}
    caps = ds.caption_vocabulary()[:3]
    assert torch.equal(loaded.lookup(caps).tokens, table.lookup(caps).tokens)
    with pytest.raises(KeyError, match="not in the cached text embeddings"):
        loaded.lookup(["a caption nobody cached"])

    def no_encoder(*a, **k):
        raise AssertionError("the text encoder was built although its embeddings are cached")
    monkeypatch.setattr(captions_module, "build_text_encoder", no_encoder)
    base = ["--dataset", "cached", "--data_path", str(cache), "--patch_size", "8", "--batch_size", "8",
            "--epochs", "1", "--max_steps", "2", "--no_eval", "--grid_freq", "0", "--num_workers", "0",
            "--precision", "fp32", "--device", "cpu", "--log_freq", "1"]
    out = main_jepat.main(main_jepat.get_args_parser().parse_args(base + ["--img_size", "16",
                                                                         "--output_dir", str(tmp_path / "run")]))
    assert out["step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    assert ckpt["captions"]["token_dim"] == 10 and ckpt["captions"]["dataset"] == "cached"
    with pytest.raises(ValueError, match="made with tokenizer 'pixels' at 16 px.*--img_size 32"):
        main_jepat.main(main_jepat.get_args_parser().parse_args(base + ["--img_size", "32",
                                                                       "--output_dir", str(tmp_path / "bad")]))
