"""Frozen image tokenizers: images [B,3,H,W] in [-1,1] <-> latent grids [B,c,h,w].

A tokenizer lives outside the trainable model and is never saved in its checkpoint; the model
only sees patchified latents [B, L, c*p*p]. New tokenizers (VAEs) register in ``TOKENIZERS``
and need nothing else from the model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from models.vae import MAR_KL16_SCALING, load_kl16, load_sd_vae, random_autoencoder


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

    def train(self, mode: bool = True) -> Tokenizer:
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


def latents_from_moments(
    moments: torch.Tensor, noise: torch.Tensor | None, scaling: float, shift: float = 0.0
) -> torch.Tensor:
    """moments [B,2c,h,w] (mean ++ log-variance) -> latents [B,c,h,w] = (mean + std*noise - shift) * scaling;
    ``noise=None`` takes the mean. The log-variance is clamped to [-30, 20] as in LDM."""
    mean, logvar = moments.chunk(2, dim=1)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * noise
    return (z - shift) * scaling


class VAETokenizer(Tokenizer):
    """A frozen diffusers ``AutoencoderKL`` behind the ``Tokenizer`` interface.

    ``encode`` samples the posterior (as MAR's training does); ``moments`` returns the
    posterior's mean and log-variance [B, 2c, h, w] unscaled, for the latent cache.
    """

    def __init__(
        self, vae: torch.nn.Module, name: str, scaling: float, shift: float = 0.0, source: str = "random init"
    ) -> None:
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        self.name, self.scaling, self.shift, self.source = name, float(scaling), float(shift), source
        self.channels = int(vae.config.latent_channels)
        self.stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.stochastic = True

    def _check(self, images: torch.Tensor) -> None:
        if (
            images.dim() != 4
            or images.shape[1] != 3
            or images.shape[-1] % self.stride
            or images.shape[-2] % self.stride
        ):
            raise ValueError(
                f"{self.name} expects images [B,3,H,W] with H and W divisible by {self.stride}, "
                f"got {tuple(images.shape)}"
            )

    @torch.no_grad()
    def moments(self, images: torch.Tensor) -> torch.Tensor:
        """images [B,3,H,W] in [-1,1] -> moments [B,2c,H/stride,W/stride] (float32)."""
        self._check(images)
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(images.to(dtype)).latent_dist.parameters.float()

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        m = self.moments(images)
        return latents_from_moments(m, torch.randn_like(m[:, : self.channels]), self.scaling, self.shift)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vae.parameters()).dtype
        z = (latents / self.scaling + self.shift).to(dtype)
        return self.vae.decode(z).sample.float().clamp(-1, 1)


def mar_kl16(path: str | None = None) -> VAETokenizer:
    """MAR's KL-16 from ``kl16.ckpt`` (default ``pretrained_models/vae/kl16.ckpt``)."""
    vae, source = load_kl16(path)
    return VAETokenizer(vae, "kl16", MAR_KL16_SCALING, source=source)


def sd_vae(path: str | None = None) -> VAETokenizer:
    """The SD-VAE from a local diffusers folder (default ``pretrained_models/sd-vae-ft-ema``)."""
    vae, scaling, shift, source = load_sd_vae(path)
    return VAETokenizer(vae, "sd-vae", scaling, shift, source=source)


def random_vae(name: str, seed: int = 0) -> VAETokenizer:
    """A VAE tokenizer of the real architecture with random weights (tests, benchmarks)."""
    vae, scaling = random_autoencoder(name, seed)
    return VAETokenizer(vae, name, scaling)


TOKENIZERS: dict[str, Callable[..., Tokenizer]] = {
    "pixels": PixelTokenizer,
    "kl16": mar_kl16,  # MAR's KL-16 (models/vae.py); path: kl16.ckpt
    "sd-vae": sd_vae,  # Stable Diffusion's VAE; path: a local diffusers folder
}


def build_tokenizer(name: str, path: str | None = None) -> Tokenizer:
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
    x = latents.reshape(B, c, h // patch, patch, w // patch, patch)  # [B,c,gh,p,gw,p]
    x = x.permute(0, 2, 4, 1, 3, 5)  # [B,gh,gw,c,p,p]
    return x.reshape(B, (h // patch) * (w // patch), c * patch * patch)


def unpatchify(tokens: torch.Tensor, channels: int, patch: int, grid: int) -> torch.Tensor:
    """[B, grid*grid, c*p*p] -> [B, c, grid*p, grid*p]; the inverse of ``patchify``."""
    B = tokens.shape[0]
    x = tokens.reshape(B, grid, grid, channels, patch, patch)  # [B,gh,gw,c,p,p]
    x = x.permute(0, 3, 1, 4, 2, 5)  # [B,c,gh,p,gw,p]
    return x.reshape(B, channels, grid * patch, grid * patch)
