"""The frozen KL-VAEs behind the ``kl16`` and ``sd-vae`` tokenizers (models/tokenizers.py), as
diffusers' ``AutoencoderKL``.

* ``kl16``: MAR's KL-16 (16 channels, stride 16, scaling 0.2325). diffusers' AutoencoderKL is
  configured to MAR's architecture (five levels 128-128-256-256-512, attention after each
  resnet of the encoder's last level, none in the decoder's levels) and MAR's ``kl16.ckpt``
  (LDM key layout under ``"model"``) is loaded by converting its keys
  (:func:`ldm_to_diffusers`; :func:`diffusers_to_ldm` is the exact inverse).
* ``sd-vae``: the Stable Diffusion VAE (4 channels, stride 8, scaling 0.18215) from a local
  diffusers folder (``config.json`` + weights), e.g. a copy of ``stabilityai/sd-vae-ft-ema``.

Latents follow the usual convention ``z = (sample - shift) * scaling``; the moments (mean and
log-variance of the posterior, before scaling) are what the latent cache stores.
"""

from __future__ import annotations

import logging
import os
import re

import torch

from models.safe_load import load_torch_file

log = logging.getLogger(__name__)

MAR_KL16_SCALING = 0.2325
SD_VAE_SCALING = 0.18215
DEFAULT_KL16_PATH = "pretrained_models/vae/kl16.ckpt"
DEFAULT_SD_VAE_PATH = "pretrained_models/sd-vae-ft-ema"
KL16_SOURCE = (
    "MAR's KL-16 VAE (kl16.ckpt, ~250 MB) is linked from the MAR repository "
    "(https://github.com/LTH14/mar, README 'Preparation', or util/download.py there)"
)
SD_VAE_SOURCE = (
    "a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors), e.g. "
    "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir pretrained_models/sd-vae-ft-ema`"
)


def mar_kl16_config() -> dict:
    """diffusers ``AutoencoderKL`` arguments that reproduce MAR's KL-16 (``models/vae.py`` there:
    ch 128, ch_mult (1,1,2,2,4), 2 resnets per level, encoder attention at the 16 px level of a
    256 px input, i.e. its last level; mid-blocks with attention; quant convs)."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",) * 5,
        block_out_channels=(128, 128, 256, 256, 512),
        act_fn="silu",
        scaling_factor=MAR_KL16_SCALING,
        sample_size=256,
    )


def sd_vae_config() -> dict:
    """The Stable Diffusion VAE's architecture (for random-init tests; real weights come from a folder)."""
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=2,
        norm_num_groups=32,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        act_fn="silu",
        scaling_factor=SD_VAE_SCALING,
        sample_size=256,
    )


# ------------------------------------------------------------------ LDM <-> diffusers key mapping
_RESNET = {"nin_shortcut": "conv_shortcut"}
_ATTN = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_TOP = {
    "norm_out": "conv_norm_out",
    "mid.block_1": "mid_block.resnets.0",
    "mid.block_2": "mid_block.resnets.1",
    "mid.attn_1": "mid_block.attentions.0",
}


def _ldm_key(key: str, levels: int) -> str:
    """One LDM key -> its diffusers name (raises KeyError for a key with no counterpart)."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    if part not in ("encoder", "decoder"):
        raise KeyError(key)
    for old, new in _TOP.items():
        if rest.startswith(old + "."):
            rest = new + rest[len(old) :]
    m = re.fullmatch(r"(down|up)\.(\d+)\.(block|attn|downsample|upsample)\.(.+)", rest)
    if m:
        kind, level, sub, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4)
        block = f"down_blocks.{level}" if kind == "down" else f"up_blocks.{levels - 1 - level}"
        if sub in ("downsample", "upsample"):
            rest = f"{block}.{sub}rs.0.{tail}"
        else:
            idx, _, name = tail.partition(".")
            rest = f"{block}.{'resnets' if sub == 'block' else 'attentions'}.{idx}.{name}"
    return f"{part}.{_rename_leaf(rest)}"


def _rename_leaf(rest: str) -> str:
    m = re.fullmatch(r"(.*\.(?:resnets|attentions)\.\d+)\.([a-z_0-9]+)\.(weight|bias)", rest)
    if not m:
        return rest
    table = _ATTN if ".attentions." in m.group(1) else _RESNET
    return f"{m.group(1)}.{table.get(m.group(2), m.group(2))}.{m.group(3)}"


def _diffusers_key(key: str, levels: int) -> str:
    """The inverse of :func:`_ldm_key`."""
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.+)", rest)
    if m:
        kind, idx, sub, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = idx if kind == "down" else levels - 1 - idx
        if sub in ("downsamplers", "upsamplers"):
            return f"{part}.{kind}.{level}.{sub[:-2]}.{tail}"
        inv = {v: k for k, v in (_ATTN if sub == "attentions" else _RESNET).items()}
        leaf, _, wb = tail.rpartition(".")
        return f"{part}.{kind}.{level}.{'block' if sub == 'resnets' else 'attn'}.{j}.{inv.get(leaf, leaf)}.{wb}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d)\.(.+)", rest)
    if m:
        sub, j, tail = m.groups()
        leaf, _, wb = tail.rpartition(".")
        if sub == "attentions":
            return f"{part}.mid.attn_1.{ {v: k for k, v in _ATTN.items()}.get(leaf, leaf) }.{wb}"
        return f"{part}.mid.block_{int(j) + 1}.{ {v: k for k, v in _RESNET.items()}.get(leaf, leaf) }.{wb}"
    if rest.startswith("conv_norm_out."):
        return f"{part}.norm_out.{rest[len('conv_norm_out.') :]}"
    return key


def _is_attention_matrix(diffusers_key: str, tensor: torch.Tensor) -> bool:
    return (
        ".attentions." in diffusers_key
        and diffusers_key.endswith("weight")
        and "group_norm" not in diffusers_key
        and tensor.dim() in (2, 4)
    )


def ldm_to_diffusers(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An LDM/MAR KL-VAE state dict -> diffusers ``AutoencoderKL`` names. Attention q/k/v/proj
    are 1x1 convs in LDM and linear layers in diffusers. Keys of the training losses
    (``loss.*``: LPIPS, discriminator) are dropped; any other unknown key raises."""
    out = {}
    for key, value in state.items():
        if key.startswith("loss."):
            continue
        try:
            new = _ldm_key(key, levels)
        except KeyError:
            raise KeyError(f"unexpected key {key!r} in an LDM KL-VAE checkpoint") from None
        if _is_attention_matrix(new, value) and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    return out


def diffusers_to_ldm(state: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """The exact inverse of :func:`ldm_to_diffusers` (used by the tests and to export weights)."""
    out = {}
    for key, value in state.items():
        if _is_attention_matrix(key, value) and value.dim() == 2:
            value = value[:, :, None, None]
        out[_diffusers_key(key, levels)] = value
    return out


def _autoencoder(config: dict) -> torch.nn.Module:
    """An AutoencoderKL with unallocated (meta) weights: loading fills them, so the ~66M-parameter
    default initialisation is never run."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return AutoencoderKL(**config)


def random_autoencoder(name: str, seed: int = 0) -> tuple[torch.nn.Module, float]:
    """(AutoencoderKL, scaling) of the real architecture with random weights (tests, benchmarks):
    convs and linears N(0, 1/fan_in), norms at identity. Same ``seed``, same weights, in any process."""
    configs = {"kl16": (mar_kl16_config, MAR_KL16_SCALING), "sd-vae": (sd_vae_config, SD_VAE_SCALING)}
    if name not in configs:
        raise ValueError(f"no VAE architecture named {name!r}; choose one of {sorted(configs)}")
    config, scaling = configs[name]
    vae = _autoencoder(config()).to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in vae.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            else:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
    return vae, scaling


def load_kl16(path: str | None = None) -> tuple[torch.nn.Module, str]:
    """(AutoencoderKL, path) of MAR's KL-16 from ``kl16.ckpt`` (default ``pretrained_models/vae/kl16.ckpt``)."""
    path = os.path.expanduser(path or DEFAULT_KL16_PATH)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no KL-16 checkpoint at {path}; {KL16_SOURCE}; put it there or pass --vae_path")
    ckpt = load_torch_file(path, "KL-16 VAE checkpoint (MAR's kl16.ckpt)")  # tensors only: nothing in it runs
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds no state dict under 'model'; expected MAR's kl16.ckpt")
    config = mar_kl16_config()
    vae = _autoencoder(config)
    converted = ldm_to_diffusers(state, levels=len(config["block_out_channels"]))
    missing, unexpected = vae.load_state_dict(converted, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(
            f"{path} does not match MAR's KL-16 architecture: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} in all)"
        )
    log.info("loaded KL-16 VAE from %s (%d tensors)", path, len(converted))
    return vae, path


def load_sd_vae(path: str | None = None) -> tuple[torch.nn.Module, float, float, str]:
    """(AutoencoderKL, scaling, shift, path) of the SD-VAE from a local diffusers folder
    (default ``pretrained_models/sd-vae-ft-ema``)."""
    path = os.path.expanduser(path or DEFAULT_SD_VAE_PATH)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(
            f"no SD-VAE folder at {path} (config.json missing); expected {SD_VAE_SOURCE}; "
            "pass its location as --vae_path"
        )
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    scaling = float(getattr(vae.config, "scaling_factor", None) or SD_VAE_SCALING)
    shift = float(getattr(vae.config, "shift_factor", None) or 0.0)
    log.info("loaded SD-VAE from %s (scaling %g, shift %g)", path, scaling, shift)
    return vae, scaling, shift, path
