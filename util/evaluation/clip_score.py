"""CLIP score (Hessel et al. 2021): 100 * max(cos(image embedding, caption embedding), 0),
averaged over the samples, with an open_clip model and open_clip's own image preprocessing.

Weights are never downloaded here: ``weights`` is a local open_clip checkpoint file or a
pretrained tag already in the Hugging Face cache; anything else is an error naming what is missing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from PIL import Image

log = logging.getLogger(__name__)


def load_clip(model_name: str, weights: str | None, device: torch.device):
    """(model, preprocess, tokenizer). ``weights=None`` builds random weights (tests only)."""
    import open_clip

    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r} for the CLIP score (e.g. ViT-B-32, ViT-L-14)")
    pretrained = weights
    if weights is not None:
        looks_like_path = os.sep in weights or weights.startswith((".", "~")) or "." in os.path.basename(weights)
        if looks_like_path:
            pretrained = os.path.expanduser(weights)
            if not os.path.isfile(pretrained):
                raise FileNotFoundError(
                    f"no CLIP weights at {pretrained} for the CLIP score; pass an open_clip "
                    "checkpoint file with --clip_score_weights, or leave it out to skip the score"
                )
        elif not open_clip.get_pretrained_cfg(model_name, weights):
            raise ValueError(
                f"unknown pretrained tag {weights!r} for {model_name}; known: "
                f"{open_clip.list_pretrained_tags_by_model(model_name)}"
            )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained, device=device)
    except Exception as e:  # an absent hub cache entry surfaces as a download error
        from huggingface_hub.constants import HF_HUB_CACHE

        raise RuntimeError(
            f"could not load CLIP weights {weights!r} for {model_name} ({e}); offline, pretrained tags "
            f"are only found in the Hugging Face cache at {HF_HUB_CACHE}; or pass a checkpoint file"
        ) from e
    return model.eval(), preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def clip_similarity(
    model,
    preprocess,
    tokenizer,
    images: torch.Tensor,
    prompts: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Cosine similarity [N] of each uint8 image [3,H,W] of ``images`` (a tensor [N,3,H,W] or a
    Dataset of such images) with its own prompt."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    out = []
    for s in range(0, len(prompts), batch_size):
        batch = [images[i] for i in range(s, min(s + batch_size, len(prompts)))]
        if batch[0].dtype != torch.uint8:
            raise ValueError(f"expected uint8 images, got {batch[0].dtype}")
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in batch]
        x = torch.stack([preprocess(p) for p in pil]).to(device)  # [b,3,224,224]
        img = F.normalize(model.encode_image(x).float(), dim=-1)  # [b,E]
        txt = F.normalize(model.encode_text(tokenizer(list(prompts[s : s + batch_size])).to(device)).float(), dim=-1)
        out.append((img * txt).sum(-1).cpu())  # [b]
    return torch.cat(out)


def clip_scores(
    model,
    preprocess,
    tokenizer,
    images: torch.Tensor,
    prompts: Sequence[str],
    device: torch.device,
    batch_size: int = 64,
) -> torch.Tensor:
    """Per-image CLIP score [N]: 100 * max(cosine, 0)."""
    return 100 * clip_similarity(model, preprocess, tokenizer, images, prompts, device, batch_size).clamp(min=0)


def clip_score(
    images, prompts: Sequence[str], model_name: str, weights: str | None, device: torch.device, batch_size: int = 64
) -> dict:
    """Mean CLIP score with its sample count, model and weights."""
    model, preprocess, tokenizer = load_clip(model_name, weights, device)
    s = clip_scores(model, preprocess, tokenizer, images, prompts, device, batch_size)
    return {
        "clip_score": float(s.mean()),
        "clip_score_std": float(s.std()) if len(s) > 1 else 0.0,
        "num_samples": len(s),
        "model": model_name,
        "weights": weights,
    }
