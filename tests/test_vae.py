"""VAE tokenizers: MAR KL-16 key conversion (exact round trip through the LDM layout), SD-VAE
from a diffusers folder, clear errors for missing weights. Random weights, small inputs."""

import pytest
import torch

from models.tokenizers import build_tokenizer, mar_kl16, random_vae, sd_vae
from models.vae import MAR_KL16_SCALING, diffusers_to_ldm, ldm_to_diffusers


def test_kl16_loads_from_the_ldm_layout_exactly(kl16_random, kl16_ckpt):
    kl16 = kl16_random
    state = kl16.vae.state_dict()
    ldm = diffusers_to_ldm(state, levels=5)
    # MAR's layout: attention after both resnets of the encoder's last level, none in the decoder's levels,
    # 1x1-conv attention projections, nin_shortcut for channel changes
    assert ldm["encoder.down.4.attn.1.proj_out.weight"].shape == (512, 512, 1, 1)
    assert ldm["encoder.down.2.block.0.nin_shortcut.weight"].shape == (256, 128, 1, 1)
    assert ldm["decoder.up.4.block.2.conv2.weight"].shape == (512, 512, 3, 3)  # LDM counts levels upward
    assert ldm["decoder.up.1.block.0.nin_shortcut.weight"].shape == (128, 256, 1, 1)
    assert not any(k.startswith("decoder.up.") and ".attn." in k for k in ldm)
    assert {k for k in ldm if ".attn." in k and k.startswith("encoder.down")} == {
        f"encoder.down.4.attn.{j}.{n}.{wb}"
        for j in (0, 1)
        for n in ("norm", "q", "k", "v", "proj_out")
        for wb in ("weight", "bias")
    }
    assert "encoder.mid.attn_1.q.weight" in ldm and "quant_conv.weight" in ldm
    assert ldm_to_diffusers(ldm, levels=5).keys() == state.keys()
    assert torch.load(kl16_ckpt)["model"]["encoder.conv_in.weight"].equal(ldm["encoder.conv_in.weight"])
    loaded = build_tokenizer("kl16", str(kl16_ckpt))
    for k, v in loaded.vae.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    m = kl16.moments(x)
    assert m.shape == (2, 32, 2, 2) and (loaded.channels, loaded.stride, loaded.scaling) == (16, 16, MAR_KL16_SCALING)
    assert torch.equal(loaded.moments(x), m)
    z = torch.randn(2, 16, 2, 2)
    assert torch.equal(loaded.decode(z), kl16.decode(z))
    torch.manual_seed(0)
    a = loaded.encode(x)
    torch.manual_seed(0)
    assert torch.equal(a, kl16.encode(x)) and not torch.equal(a, loaded.encode(x))  # the posterior is sampled


def test_kl16_checkpoint_errors(tmp_path, kl16_random):
    kl16 = kl16_random
    with pytest.raises(FileNotFoundError, match=r"no KL-16 checkpoint at .*nowhere/kl16.ckpt.*LTH14/mar"):
        mar_kl16(str(tmp_path / "nowhere" / "kl16.ckpt"))
    ldm = diffusers_to_ldm(kl16.vae.state_dict(), levels=5)
    del ldm["encoder.conv_in.weight"]
    torch.save({"model": ldm}, tmp_path / "partial.ckpt")
    with pytest.raises(ValueError, match="does not match MAR's KL-16.*encoder.conv_in.weight"):
        mar_kl16(str(tmp_path / "partial.ckpt"))
    torch.save({"model": {**ldm, "encoder.extra.weight": torch.zeros(1)}}, tmp_path / "odd.ckpt")
    with pytest.raises(ValueError, match="unexpected.*encoder.extra.weight"):
        mar_kl16(str(tmp_path / "odd.ckpt"))


def test_sd_vae_from_a_diffusers_folder(tmp_path):
    from diffusers import AutoencoderKL

    with pytest.raises(FileNotFoundError, match=r"no SD-VAE folder at .*missing.*sd-vae-ft-ema"):
        sd_vae(str(tmp_path / "missing"))
    torch.manual_seed(0)
    small = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        scaling_factor=0.18215,
    )
    small.save_pretrained(tmp_path / "vae")
    tok = build_tokenizer("sd-vae", str(tmp_path / "vae"))
    assert (tok.name, tok.channels, tok.stride, tok.scaling) == ("sd-vae", 4, 2, 0.18215)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.allclose(tok.moments(x), small.eval().encode(x).latent_dist.parameters)
    real = random_vae("sd-vae")  # the real architecture: 4 channels, stride 8
    assert (real.channels, real.stride) == (4, 8)
    assert real.encode(torch.zeros(1, 3, 32, 32)).shape == (1, 4, 4, 4)
    assert real.decode(torch.zeros(1, 4, 4, 4)).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="divisible by 8"):
        real.encode(torch.zeros(1, 3, 20, 20))
