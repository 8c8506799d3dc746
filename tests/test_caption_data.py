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
from util.data import captions as captions_module
from util.data.caption_table import CaptionRows, CaptionTable, write_caption_table
from util.data.captions import CaptionStore, text_cache_key
from util.data.datasets import build_dataset
from util.data.draws import ItemKey, draw_seed
from util.data.image_folders import imagenet_class_names
from util.data.latent_cache import CachedLatentDataset
from util.errors import UserError
from util.training.checkpoint import checkpoint_recipe


def write_manifest(root: Path) -> Path:
    rng = np.random.default_rng(1)
    (root / "img").mkdir(parents=True)
    for name, (h, w) in (("a", (20, 24)), ("b", (10, 12)), ("c", (20, 20))):  # b: smaller than the crop
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{name}.png")
    Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).convert("CMYK").save(root / "img/cmyk.jpg")
    lines = [
        {"image": "img/a.png", "caption": "a red kite over a beach"},
        {"image": "img/b.png", "caption": ["two dogs", "", "a pair of dogs"]},  # one of the non-empty ones per step
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
        ["a red kite over a beach", "two dogs", "a pair of dogs", "a print"]
    )
    seen = {raw[ItemKey(1, draw_seed(0, epoch, 1))][1] for epoch in range(30)}  # one of its captions per epoch
    assert seen == {"two dogs", "a pair of dogs"} and raw[1][1] == raw[1][1]
    assert raw[0][0].shape == (3, 16, 16) and -1 <= raw[0][0].min() and raw[0][0].max() <= 1
    # captions may say "left" or hold text: no flips unless asked for
    assert raw.flip is False and build_dataset("captions", str(manifest), img_size=16, flip=True).flip is True

    cache = tmp_path / "cache"
    counts = main_cache.main(
        main_cache.get_args_parser().parse_args(
            [
                "--dataset",
                "captions",
                "--data_path",
                str(manifest),
                *"--tokenizer pixels --img_size 16 --cache_dir".split(),
                str(cache),
                *"--batch_size 2 --num_workers 0 --no_text_cache --device cpu --random_flip".split(),
            ]
        )
    )
    assert counts == {"seen": 9, "cached": 3, "skipped": 6, "converted": 2, "pending": 0}
    reasons = [json.loads(line)["reason"] for line in (cache / "skipped.jsonl").read_text().splitlines()]
    for why in (
        "missing",
        "empty or missing caption",
        "empty or missing caption",
        "duplicate path",
        'no "image" path',
        "not JSON",
    ):
        assert sum(why in r for r in reasons) >= 1, (why, reasons)
    notes = [json.loads(line)["note"] for line in (cache / "converted.jsonl").read_text().splitlines()]
    assert sorted(n.split(" ")[0] for n in notes) == ["CMYK", "upscaled"], notes  # --small_images upscale
    assert CachedLatentDataset(cache).flip is False  # caption data: the flips stay unused by default
    ds = CachedLatentDataset(cache, flip=True)
    ds.check("pixels", 16)
    i = [p.decode() for p in ds.index["path"]].index("img/a.png")
    plain = torch.from_numpy(np.array(ds.moments(i)[0]))
    assert torch.equal(torch.from_numpy(np.array(ds.moments(i)[1])), plain.flip(-1))
    got = [ds[ItemKey(i, draw_seed(0, epoch, i))][0] for epoch in range(20)]  # the item in 20 epochs
    assert all(g.shape == (3, 16, 16) for g in got)
    flips = [bool(torch.equal(g, plain.flip(-1))) for g in got]
    assert all(torch.equal(g, plain) or f for g, f in zip(got, flips)) and 0 < sum(flips) < 20

    # the default caption cache holds no flips, says so, and refuses to flip
    plain_only = tmp_path / "plain_only"
    main_cache.main(
        main_cache.get_args_parser().parse_args(
            [
                "--dataset",
                "captions",
                "--data_path",
                str(manifest),
                *"--tokenizer pixels --img_size 16 --cache_dir".split(),
                str(plain_only),
                *"--batch_size 2 --num_workers 0 --no_text_cache --device cpu".split(),
            ]
        )
    )
    assert json.loads((plain_only / "meta.json").read_text())["flipped"] is False
    ds = CachedLatentDataset(plain_only)
    assert ds.moments(0).shape[0] == 1 and torch.equal(ds[0][0], torch.from_numpy(np.array(ds.moments(0)[0])))
    with pytest.raises(ValueError, match="no flipped moments.*--no-random_flip"):
        CachedLatentDataset(plain_only, flip=True)


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
        return TextEmbeddings(
            torch.randn(len(prompts), self.max_length, self.token_dim, generator=g),
            mask,
            torch.randn(len(prompts), self.pooled_dim, generator=g),
        )


def test_training_from_a_shapes_cache_never_builds_the_text_encoder(tmp_path, monkeypatch):
    cache = tmp_path / "shapes"
    counts = main_cache.main(
        main_cache.get_args_parser().parse_args(
            [
                *"--dataset shapes --num_samples 40 --tokenizer pixels --img_size 16 --cache_dir".split(),
                str(cache),
                *"--shard_size 16 --batch_size 8 --num_workers 0 --no_text_cache --device cpu".split(),
            ]
        )
    )
    assert counts["cached"] == 40 and counts["seen"] == 40
    ds = CachedLatentDataset(cache)
    vocab = ds.caption_vocabulary()
    key = text_cache_key("minilm", 16)
    folder = cache / "text" / key
    write_caption_table(folder, vocab, StubEncoder(), batch_size=len(vocab))
    table = CaptionTable(folder)
    expected = StubEncoder().encode(vocab)  # one batch, as the table was written
    assert len(table) == len(vocab) == 144 and table.caption(5) == vocab[5]
    rows = table.rows(torch.tensor([7, 0, 7]), torch.device("cpu"))
    assert torch.allclose(rows.tokens, expected.tokens[[7, 0, 7]], atol=2e-3)  # float16 on disk
    assert torch.equal(rows.mask, expected.mask[[7, 0, 7]])
    assert table.find([vocab[9], "a caption nobody cached", vocab[0]]).tolist() == [9, -1, 0]
    # a killed write resumes at the rows still missing, with the same result
    state = np.load(folder / "state.npy", mmap_mode="r+")
    state[3:50] = 0
    state.flush()
    with pytest.raises(ValueError, match="incomplete.*rerun main_cache.py"):
        CaptionTable(folder)
    write_caption_table(folder, vocab, StubEncoder(), batch_size=len(vocab))
    assert torch.equal(CaptionTable(folder).rows(torch.arange(144), torch.device("cpu")).mask, expected.mask)
    store = CaptionStore(
        None, info={"name": "minilm", "token_dim": 10, "pooled_dim": 8, "max_length": 16}, table=CaptionTable(folder)
    )
    assert torch.equal(store.lookup(vocab[:3]).pooled, store.lookup(torch.tensor([0, 1, 2])).pooled)
    with pytest.raises(KeyError, match="not in the cached text embeddings"):
        store.lookup(["a caption nobody cached"])
    # training reads the table through the loader: each item carries its caption's stored rows
    ds.use_caption_table(folder)
    _, rows = ds[ItemKey(7, draw_seed(0, 0, 7))]
    assert isinstance(rows, CaptionRows) and rows.tokens.dtype == torch.float16 and rows.tokens.shape == (16, 10)
    assert any(torch.equal(rows.pooled, table.gather(np.array([r])).pooled[0]) for r in range(144))

    def no_encoder(*a, **k):
        raise AssertionError("the text encoder was built although its embeddings are cached")

    monkeypatch.setattr(captions_module, "build_text_encoder", no_encoder)
    base = [
        "--dataset",
        "cached",
        "--data_path",
        str(cache),
        *(
            "--patch_size 8 --batch_size 8 --epochs 1 --max_steps 2 --no_eval --grid_freq 0 "
            "--num_workers 0 --precision fp32 --device cpu --log_freq 1"
        ).split(),
    ]
    out = main_jepat.main(
        main_jepat.get_args_parser().parse_args(base + ["--img_size", "16", "--output_dir", str(tmp_path / "run")])
    )
    assert out["step"] == 2
    ckpt = torch.load(tmp_path / "run" / "checkpoint-last.pth", weights_only=True)
    captions = checkpoint_recipe(ckpt)["captions"]
    assert captions["token_dim"] == 10 and captions["dataset"] == "cached"
    with pytest.raises(ValueError, match="made with tokenizer 'pixels' at 16 px.*--img_size 32"):
        main_jepat.main(
            main_jepat.get_args_parser().parse_args(base + ["--img_size", "32", "--output_dir", str(tmp_path / "bad")])
        )

    # evaluation prompts the cache does not hold: the checkpoint's text encoder is built for them,
    # or, when its weights are missing, the run stops at start-up naming a prompt and the flag
    (tmp_path / "prompts.txt").write_text(f"{vocab[0]}\na violet hexagon\n")
    evaluate = base + [
        *"--img_size 16 --evaluate --resume".split(),
        str(tmp_path / "run" / "checkpoint-last.pth"),
        "--eval_prompts_file",
        str(tmp_path / "prompts.txt"),
        *"--eval_metrics isc --fid_feature_extractor jepat-test-tiny --num_iter 2 --ode_steps 2 --output_dir".split(),
        str(tmp_path / "eval"),
    ]

    def missing_weights(*a, **k):
        raise FileNotFoundError("no MiniLM weights at /nowhere")

    monkeypatch.setattr(captions_module, "build_text_encoder", missing_weights)
    with pytest.raises(
        UserError, match="not in the cached caption embeddings.*'a violet hexagon'.*--text_encoder_path"
    ):
        main_jepat.main(main_jepat.get_args_parser().parse_args(evaluate))
    assert not (tmp_path / "eval" / "samples").exists()  # stopped before generating anything
    monkeypatch.setattr(captions_module, "build_text_encoder", lambda *a, **k: StubEncoder())
    m = main_jepat.main(main_jepat.get_args_parser().parse_args(evaluate))
    assert m["num_samples"] == 2 and m["unseen_prompts"] == 1


class PerCaptionEncoder(StubEncoder):
    """Embeddings that depend on the caption alone (what a frozen encoder gives)."""

    def _encode(self, prompts):
        out = []
        for p in prompts:
            g = torch.Generator().manual_seed(sum(ord(ch) * (i + 1) for i, ch in enumerate(p)))
            mask = torch.zeros(1, self.max_length, dtype=torch.bool)
            mask[:, : 1 + len(p) % 5] = True
            out.append(
                TextEmbeddings(
                    torch.randn(1, self.max_length, self.token_dim, generator=g),
                    mask,
                    torch.randn(1, self.pooled_dim, generator=g),
                )
            )
        return TextEmbeddings.cat(out)


def test_in_memory_store_is_bounded_and_evicts_the_least_recently_used():
    enc = PerCaptionEncoder()
    store = CaptionStore(enc, capacity=4, encode_batch_size=2)
    store.lookup(["a", "b", "c"])
    store.lookup(["b"])  # b is now more recent than a and c
    store.lookup(["d", "e"])  # full: a and c go, oldest first
    assert list(store.index) == ["c", "b", "d", "e"] and len(store.slots) == 4  # d took the last free slot
    got = store.lookup(["e", "a", "b", "a"])  # a comes back, encoded again, into c's slot
    assert list(store.index) == ["d", "e", "b", "a"]
    want = enc.encode(["e", "a", "b", "a"])
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.pooled, want.pooled) and len(store.slots) == 4 and len(store.index) == 4
    with pytest.raises(ValueError, match="exceeds the store's capacity of 4"):
        store.lookup(["v", "w", "x", "y", "z"])
