import pytest
import torch

from models.tokenizers import TOKENIZERS, build_tokenizer, patchify, unpatchify


@pytest.mark.parametrize("patch", [1, 2, 4, 8])
def test_patchify_round_trip(patch):
    x = torch.randn(2, 3, 16, 16)
    tokens = patchify(x, patch)
    assert tokens.shape == (2, (16 // patch) ** 2, 3 * patch * patch)
    assert torch.equal(unpatchify(tokens, 3, patch, 16 // patch), x)


def test_patchify_keeps_each_patch_together():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    tokens = patchify(x, 2)
    assert tokens[0, 0].tolist() == [0, 1, 4, 5] and tokens[0, 3].tolist() == [10, 11, 14, 15]


def test_pixel_tokenizer_is_the_identity_and_frozen():
    tok = build_tokenizer("pixels")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(tok.decode(tok.encode(x)), x)
    assert (tok.channels, tok.stride) == (3, 1)
    assert not tok.train().training
    with pytest.raises(ValueError, match=r"\[B,3,H,W\]"):
        tok.encode(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.rand(1, 3, 10, 10), 4)


def test_unknown_tokenizer():
    with pytest.raises(ValueError, match="choose one of"):
        build_tokenizer("vq")
    assert "pixels" in TOKENIZERS
