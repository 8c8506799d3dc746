"""Frozen image tokenizers: images [B,3,H,W] in [-1,1] <-> latent grids [B,c,h,w].

A tokenizer lives outside the trainable model and is never saved in its checkpoint; the model
only sees patchified latents [B, L, c*p*p]. New tokenizers (VAEs) register in ``TOKENIZERS``
and need nothing else from the model.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn as nn


class Tokenizer(nn.Module):
    """Interface: ``encode`` images -> latents, ``decode`` latents -> images.

    Attributes: name, channels (c), stride (H / h).
    """
    name: str = ""
    channels: int = 3
    stride: int = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> latents [B,c,H/stride,W/stride]."""
        raise NotImplementedError

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """latents [B,c,h,w] -> images [B,3,h*stride,w*stride] in [-1,1]."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> "Tokenizer":
        return super().train(False)  # frozen: always in eval mode


class PixelTokenizer(Tokenizer):
    """The identity: raw pixels are the latents (3 channels, stride 1)."""
    name = "pixels"
    channels = 3
    stride = 1

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"pixel tokenizer expects images [B,3,H,W], got {tuple(images.shape)}")
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


def _kl16(path: Optional[str] = None) -> Tokenizer:
    from models.vae import mar_kl16  # diffusers is imported only when a VAE is built
    return mar_kl16(path)


def _sd_vae(path: Optional[str] = None) -> Tokenizer:
    from models.vae import sd_vae
    return sd_vae(path)


TOKENIZERS: Dict[str, Callable[..., Tokenizer]] = {
    "pixels": PixelTokenizer,
    "kl16": _kl16,      # MAR's KL-16 (models/vae.py); path: kl16.ckpt
    "sd-vae": _sd_vae,  # Stable Diffusion's VAE; path: a local diffusers folder
}


def build_tokenizer(name: str, path: Optional[str] = None) -> Tokenizer:
    """``path``: the VAE weights (ignored by ``pixels``; VAEs fall back to their default location)."""
    if name not in TOKENIZERS:
        raise ValueError(f"unknown tokenizer {name!r}; choose one of {sorted(TOKENIZERS)}")
    if name == "pixels":
        return TOKENIZERS[name]().eval()
    return TOKENIZERS[name](path).eval()


def patchify(latents: torch.Tensor, patch: int) -> torch.Tensor:
    """[B,c,h,w] -> [B, (h/p)*(w/p), c*p*p] tokens in raster order."""
    B, c, h, w = latents.shape
    if h % patch or w % patch:
        raise ValueError(f"latent grid {h}x{w} is not divisible by patch size {patch}")
    x = latents.reshape(B, c, h // patch, patch, w // patch, patch)                  # [B,c,gh,p,gw,p]
    x = x.permute(0, 2, 4, 1, 3, 5)                                                   # [B,gh,gw,c,p,p]
    return x.reshape(B, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int, patch: int, grid: int) -> torch.Tensor:
    """[B, grid*grid, c*p*p] -> [B, c, grid*p, grid*p]; the inverse of ``patchify``."""
    B = tokens.shape[0]
    x = tokens.reshape(B, grid, grid, channels, patch, patch)                        # [B,gh,gw,c,p,p]
    x = x.permute(0, 3, 1, 4, 2, 5)                                                   # [B,c,gh,p,gw,p]
    return x.reshape(B, channels, grid * patch, grid * patch)
