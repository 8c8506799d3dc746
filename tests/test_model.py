import copy
import math

import pytest
import torch
from scipy.stats import truncnorm

from models import jepat as jepat_module
from models.flow_head import FlowHead, flow_matching_loss, integrate_flow, sample_tokens_from_head
from models.jepat import (
    JEPAT_MODELS,
    build_model,
    mask_from_orders,
    random_orders,
    sample_mask_ratio,
)
from models.loss import EMATarget, JEPATLoss
from models.sampler import SamplingConfig, num_hidden_after, sample_tokens
from models.text_encoders import TextEmbeddings
from tests.helpers import SEQ_LEN, TOKEN_DIM, S, random_text, tiny_model

REFERENCE_COUNTS = {"base": 216_152_080, "large": 694_769_168, "huge": 1_438_206_992}


def test_module_shapes():
    model = tiny_model()
    B = 3
    text = random_text(B)
    cond = model.condition(text, torch.zeros(B, dtype=torch.bool))
    assert cond.c.shape == (B, 32) and cond.tau.shape == (B, S, 32) and cond.u.shape == (B, 8)
    x = torch.randn(B, SEQ_LEN, TOKEN_DIM)
    orders = random_orders(B, SEQ_LEN, torch.device("cpu"))
    z = model(x, cond, orders, num_masked=11)
    assert z.shape == (B, SEQ_LEN, 32)
    assert model.encode(x, cond, orders[:, 11:]).shape == (B, 2 + 5, 32)
    assert model.encode_full(x, cond).shape == (B, SEQ_LEN, 32)
    v = model.flow_head(torch.randn(7, TOKEN_DIM), torch.rand(7), torch.randn(7, 32))
    assert v.shape == (7, TOKEN_DIM)


def test_visible_tokens_only_reach_the_encoder():
    """Hidden tokens' values must not influence the prediction."""
    model = tiny_model()
    text, B = random_text(2), 2
    cond = model.condition(text, torch.zeros(B, dtype=torch.bool))
    x = torch.randn(B, SEQ_LEN, TOKEN_DIM)
    orders = random_orders(B, SEQ_LEN, torch.device("cpu"), torch.Generator().manual_seed(1))
    hidden = mask_from_orders(orders, 10)
    x2 = x.clone()
    x2[hidden] = torch.randn_like(x2[hidden])
    assert torch.allclose(model(x, cond, orders, 10), model(x2, cond, orders, 10))
    x3 = x.clone()
    x3[~hidden] += 1.0
    assert not torch.allclose(model(x, cond, orders, 10), model(x3, cond, orders, 10))


def test_mask_ratio_distribution():
    g = torch.Generator().manual_seed(0)
    r = torch.tensor([sample_mask_ratio(g, 0.7, 0.25) for _ in range(20000)])
    assert r.min() >= 0.7 and r.max() <= 1.0
    ref = truncnorm((0.7 - 1.0) / 0.25, 0.0, loc=1.0, scale=0.25)
    assert abs(r.mean().item() - ref.mean()) < 0.003
    assert abs(r.std().item() - ref.std()) < 0.003


def test_orders_and_masks():
    orders = random_orders(5, SEQ_LEN, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.equal(orders.sort(dim=1).values, torch.arange(SEQ_LEN).expand(5, -1))
    assert not torch.equal(orders[0], orders[1])
    mask = mask_from_orders(orders, 7)
    assert mask.sum(1).tolist() == [7] * 5
    assert mask.gather(1, orders[:, :7]).all() and not mask.gather(1, orders[:, 7:]).any()


class OracleHead(torch.nn.Module):
    """Knows the data: every token equals z, so the true velocity is (z - x_t) / (1 - t)."""

    token_dim = TOKEN_DIM

    def forward(self, x_t, t, z):
        return (z - x_t) / (1 - t[:, None]).clamp(min=1e-4)


def test_flow_loss_is_zero_for_the_true_velocity():
    torch.manual_seed(0)
    x = torch.randn(64, TOKEN_DIM)
    assert flow_matching_loss(OracleHead(), x, x, repeat=4) < 1e-6
    # and clearly not for a head that is wrong
    assert flow_matching_loss(OracleHead(), x, x + 0.5, repeat=4) > 0.1


class GaussianOracleHead(torch.nn.Module):
    """Exact velocity field for data ~ N(z, SIGMA^2 I): its ODE maps noise n to z + SIGMA * n."""

    token_dim = TOKEN_DIM
    SIGMA = 0.5

    def forward(self, x_t, t, z):
        t = t[:, None]
        a = t * self.SIGMA**2 - (1 - t)
        b = t**2 * self.SIGMA**2 + (1 - t) ** 2
        return z + a / b * (x_t - t * z)

    def prepare(self, z):
        return lambda x_t, t: self(x_t, torch.full((x_t.shape[0],), t), z)


@pytest.mark.parametrize("sampler,steps,tol", [("euler", 200, 2e-2), ("heun", 20, 2e-3)])
def test_ode_transports_noise_to_the_data(sampler, steps, tol):
    mu = torch.randn(6, TOKEN_DIM)
    gen = torch.Generator().manual_seed(3)
    out = sample_tokens_from_head(GaussianOracleHead(), mu, 0.8, steps, sampler, generator=gen)
    noise = torch.randn(6, TOKEN_DIM, generator=torch.Generator().manual_seed(3)) * 0.8
    assert torch.allclose(out, mu + GaussianOracleHead.SIGMA * noise, atol=tol)


def test_heun_is_more_accurate_than_euler():
    """dx/dt = -x from t=0 to 1 has x(1) = x0 / e."""
    x0 = torch.ones(1, 1)
    exact = x0 / math.e
    err = {s: (integrate_flow(lambda x, t: -x, x0, 8, s) - exact).abs().item() for s in ("euler", "heun")}
    assert err["heun"] < err["euler"] / 5


def test_temperature_scales_the_initial_noise():
    head = FlowHead(TOKEN_DIM, 16, 16, 1)  # zero-initialised output: velocity 0, sample = initial noise
    head.zero_init_modulation()
    z = torch.randn(4000, 16)
    std = {
        t: sample_tokens_from_head(head, z, t, 2, "euler", generator=torch.Generator().manual_seed(0)).std().item()
        for t in (1.0, 0.5)
    }
    assert abs(std[1.0] - 1.0) < 0.02 and abs(std[0.5] - 0.5) < 0.01


def test_cosine_schedule_reveals_at_least_one_token_per_step():
    for L, K in ((16, 16), (256, 64), (16, 4), (64, 1)):
        hidden, seq = L, []
        for k in range(K):
            hidden_next = num_hidden_after(k, K, L, hidden)
            assert hidden_next < hidden
            seq.append(hidden_next)
            hidden = hidden_next
        assert seq[-1] == 0


def _sample(model, text, seed=0, **sampling):
    sc = SamplingConfig(**{**dict(num_iter=4, guidance_scale=3.0, ode_steps=3, ode_solver="euler"), **sampling})
    return sample_tokens(
        model, text, torch.zeros(len(text), dtype=torch.bool), sc, generator=torch.Generator().manual_seed(seed)
    )


def test_same_seed_same_samples():
    model, text = tiny_model(), random_text(3)
    a, b = _sample(model, text, 0), _sample(model, text, 0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _sample(model, text, 1))


def test_sampling_goes_through_cross_attention_and_fusion():
    model, text = tiny_model(), random_text(2)
    base = _sample(model, text)
    other_caption = random_text(2, seed=5)
    assert not torch.allclose(base, _sample(model, other_caption), atol=1e-4)
    # captions that differ only in their token states (same pooled vector) still differ:
    # the cross-attention over tokens is on the sampling path
    tokens_only = copy.deepcopy(text)
    tokens_only.tokens = tokens_only.tokens + torch.randn_like(tokens_only.tokens)
    assert not torch.allclose(base, _sample(model, tokens_only), atol=1e-4)
    for part in ("cross_attn", "text_inject"):
        ablated = copy.deepcopy(model)
        torch.nn.init.zeros_(getattr(ablated, part).weight if part == "text_inject" else ablated.cross_attn.proj.weight)
        assert not torch.allclose(base, _sample(ablated, text), atol=1e-4), part


def test_cross_attention_ignores_padding():
    model = tiny_model()
    text = random_text(2, valid=3)
    cond = model.condition(text, torch.zeros(2, dtype=torch.bool))
    z = torch.randn(2, SEQ_LEN, 32)
    padded = copy.deepcopy(text)
    padded.tokens[:, 3:] = torch.randn_like(padded.tokens[:, 3:]) * 10
    cond_p = model.condition(padded, torch.zeros(2, dtype=torch.bool))
    assert torch.allclose(model.fuse_text(z, cond), model.fuse_text(z, cond_p), atol=1e-6)
    real = copy.deepcopy(text)
    real.tokens[:, 1] += 1.0
    assert not torch.allclose(
        model.fuse_text(z, cond), model.fuse_text(z, model.condition(real, torch.zeros(2, dtype=torch.bool)))
    )


def test_cfg_scale_one_equals_the_conditional_branch():
    model, text = tiny_model(), random_text(3)
    sc = SamplingConfig(num_iter=4, guidance_scale=1.0, ode_steps=3, ode_solver="heun")
    null = torch.zeros(3, dtype=torch.bool)
    guided = sample_tokens(model, text, null, sc, torch.Generator().manual_seed(0), batch_null=True)
    plain = sample_tokens(model, text, null, sc, torch.Generator().manual_seed(0), batch_null=False)
    assert torch.allclose(guided, plain, atol=1e-5)
    strong = sample_tokens(
        model, text, null, SamplingConfig(num_iter=4, guidance_scale=4.0, ode_steps=3), torch.Generator().manual_seed(0)
    )
    assert not torch.allclose(strong, plain, atol=1e-3)


def test_null_condition_replaces_the_caption():
    model = tiny_model()
    a, b = random_text(2, seed=0), random_text(2, seed=1)
    drop = torch.ones(2, dtype=torch.bool)
    ca, cb = model.condition(a, drop), model.condition(b, drop)
    for k in ("c", "tau", "u"):
        assert torch.equal(getattr(ca, k), getattr(cb, k))
    assert ca.tau_mask[:, 0].all() and not ca.tau_mask[:, 1:].any()


def test_training_and_sampling_share_one_conditioning_path(monkeypatch):
    model, text = tiny_model(), random_text(4)
    calls = []
    original = type(model).condition

    def spy(self, t, drop):
        calls.append(drop.clone())
        return original(self, t, drop)

    monkeypatch.setattr(type(model), "condition", spy)
    ema = copy.deepcopy(model)
    JEPATLoss()(
        model.train(), EMATarget(ema), torch.randn(4, SEQ_LEN, TOKEN_DIM), text, torch.Generator().manual_seed(0)
    )
    assert len(calls) == 2  # the model, and the EMA target with the same drop mask
    assert torch.equal(calls[0], calls[1])
    calls.clear()
    _sample(model.eval(), text, guidance_scale=2.0)
    assert len(calls) == 1 and calls[0].tolist() == [False] * 4 + [True] * 4  # once per batch, cond + null


@pytest.mark.parametrize("fusion", jepat_module.FUSION_MODES)
def test_training_losses_backpropagate_to_every_trainable_part(fusion):
    model = tiny_model(fusion=fusion).train()
    ema = copy.deepcopy(model)
    out = JEPATLoss()(
        model, EMATarget(ema), torch.randn(4, SEQ_LEN, TOKEN_DIM), random_text(4), torch.Generator().manual_seed(0)
    )
    out["loss"].backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_grad = [n for n, p in trainable.items() if p.grad is None or p.grad.abs().sum() == 0]
    # with cond_drop_prob 0.1 and 4 samples the null params may see no gradient in one step
    assert set(no_grad) <= {"null_pooled", "null_token"}, no_grad
    # exactly the parts the mode never uses are frozen (and they keep their place in the state dict)
    frozen = {n.split(".")[0] for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == set(jepat_module.UNUSED_BY_FUSION[fusion])
    assert set(model.state_dict()) == set(tiny_model(fusion="full").state_dict())
    assert all(p.grad is None for p in ema.parameters())


def test_fusion_modes_build_and_differ():
    text = random_text(2)
    outs = {}
    for mode in jepat_module.FUSION_MODES:
        model = tiny_model(fusion=mode)
        outs[mode] = _sample(model, text)
    assert not torch.allclose(outs["full"], outs["input_only"])


def test_registry_and_errors():
    assert set(JEPAT_MODELS) == {"tiny", "base", "large", "huge"}
    with pytest.raises(ValueError, match="choose one of"):
        build_model("gigantic", token_dim=4, seq_len=4, text_token_dim=4, text_pooled_dim=4)
    with pytest.raises(ValueError, match="fusion"):
        tiny_model(fusion="middle")


@pytest.mark.parametrize("preset", ["base", "large", "huge"])
def test_parameter_counts_within_one_percent_of_the_reference(preset):
    # the reference counts the published code's model, which fuses text everywhere (full)
    with torch.device("meta"):
        model = build_model(preset, token_dim=16, seq_len=256, text_token_dim=768, text_pooled_dim=768, fusion="full")
    total = model.num_params()["total"]
    assert abs(total / REFERENCE_COUNTS[preset] - 1) < 0.01, total


def test_x_prediction_head_returns_the_implied_velocity():
    torch.manual_seed(0)
    v_head = FlowHead(TOKEN_DIM, 16, 32, 2, prediction="v")
    x_head = FlowHead(TOKEN_DIM, 16, 32, 2, prediction="x")
    x_head.load_state_dict(v_head.state_dict())
    x_t, t, z = torch.randn(5, TOKEN_DIM), torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0]), torch.randn(5, 16)
    x_hat = v_head(x_t, t, z)  # same network: its raw output is x_hat for the x head
    expected = (x_hat - x_t) / (1 - t[:, None]).clamp(min=0.05)
    assert torch.allclose(x_head(x_t, t, z), expected, atol=1e-6)
    with pytest.raises(ValueError, match="prediction"):
        FlowHead(TOKEN_DIM, 16, 32, 2, prediction="eps")


def test_step_hook_sees_the_canvas_fill_in_without_changing_the_samples():
    model, text = tiny_model(), random_text(2)
    sc = SamplingConfig(num_iter=4, guidance_scale=2.0, ode_steps=2, ode_solver="euler")
    null = torch.zeros(2, dtype=torch.bool)
    seen = []
    hooked = sample_tokens(
        model,
        text,
        null,
        sc,
        torch.Generator().manual_seed(0),
        on_step=lambda step, tokens, known: seen.append((step, tokens.clone(), known.clone())),
    )
    plain = sample_tokens(model, text, null, sc, torch.Generator().manual_seed(0))
    assert torch.equal(hooked, plain)
    assert [s for s, _, _ in seen] == [0, 1, 2, 3]
    counts = [int(k[0].sum()) for _, _, k in seen]
    assert counts == sorted(counts) and counts[-1] == SEQ_LEN and counts[0] >= 1
    for _, tokens, known in seen:  # hidden tokens are still zeros, known ones are not
        assert (tokens[~known] == 0).all() and (tokens[known].abs().sum(-1) > 0).all()
    assert torch.equal(seen[-1][1], plain)


def test_text_fusion_of_a_subset_of_positions_equals_fusing_all_of_them():
    for fusion in ("full", "late_only", "input_only"):
        model, text = tiny_model(fusion=fusion).eval(), random_text(2)
        cond = model.condition(text, torch.tensor([False, True]))
        z = torch.randn(2, SEQ_LEN, 32)
        positions = torch.stack([torch.randperm(SEQ_LEN)[:5] for _ in range(2)])  # [2,5]
        part = model.fuse_text(z.gather(1, positions[..., None].expand(-1, -1, 32)), cond, positions)
        whole = model.fuse_text(z, cond).gather(1, positions[..., None].expand(-1, -1, 32))
        assert torch.allclose(part, whole, atol=1e-5), fusion


@pytest.mark.parametrize("fusion", ["late_only", "full"])
def test_late_fusion_shares_one_backbone_pass_between_the_cfg_rows(fusion, monkeypatch):
    model, text = tiny_model(fusion=fusion).eval(), random_text(3)
    rows = []
    model.encoder_blocks[0].register_forward_hook(lambda m, i, o: rows.append(o.shape[0]))
    shared = _sample(model, text, guidance_scale=3.0)
    assert set(rows) == ({3} if fusion == "late_only" else {6})  # B rows, or B + B
    # the same samples as running both rows through the backbone: the sampler's one look at the
    # property says False; the encoder and predictor still see the model's real mode
    first = iter([False])
    real = type(model).text_free_backbone.fget
    monkeypatch.setattr(type(model), "text_free_backbone", property(lambda self: next(first, real(self))))
    rows.clear()
    separate = _sample(model, text, guidance_scale=3.0)
    assert set(rows) == {6}
    assert torch.allclose(shared, separate, atol=1e-4)
    assert not torch.allclose(shared, _sample(model, text, guidance_scale=1.0), atol=1e-3)  # guidance still acts


@pytest.mark.parametrize("prediction", ["v", "x"])
def test_prepared_head_velocity_equals_the_forward_pass(prediction):
    head = tiny_model(flow_prediction=prediction).flow_head.eval()
    z, x = torch.randn(5, 32), torch.randn(5, TOKEN_DIM)
    velocity = head.prepare(z)
    for t in (0.0, 0.25, 0.25, 0.5, 0.99):  # a repeated t comes from the cache
        assert torch.allclose(velocity(x, t), head(x, torch.full((5,), t), z), atol=1e-5, rtol=1e-4), t


@pytest.mark.parametrize("qk_norm", [False, True])
def test_our_block_is_timms_vit_block(qk_norm):
    """The same parameter names, outputs, dropout draws and gradients as timm's Block."""
    from timm.models.vision_transformer import Block as TimmBlock

    from models.blocks import Block

    kw = dict(mlp_ratio=4.0, qkv_bias=True, qk_norm=qk_norm, proj_drop=0.1, attn_drop=0.1)
    ours, theirs = Block(32, 4, **kw), TimmBlock(32, 4, norm_layer=torch.nn.LayerNorm, **kw)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    torch.manual_seed(0)
    for p in ours.parameters():  # LayerNorms too: not their init values
        torch.nn.init.normal_(p, std=0.2)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 32)
    for train in (False, True):
        ours.train(train), theirs.train(train)
        torch.manual_seed(1)
        a = ours(x)
        torch.manual_seed(1)
        b = theirs(x)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    a.square().sum().backward(), b.square().sum().backward()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=name)


def test_caption_noise_perturbs_real_tokens_and_the_pooled_vector_at_its_scale():
    from models.loss import noisy_caption

    torch.manual_seed(0)
    text = random_text(256, valid=3)
    text = TextEmbeddings(text.tokens * 3.0, text.mask, text.pooled * 0.2)  # unlike scales: noise follows each
    noisy = noisy_caption(text, 0.5)
    d_tok, d_pool = noisy.tokens - text.tokens, noisy.pooled - text.pooled
    assert torch.equal(d_tok[:, 3:], torch.zeros_like(d_tok[:, 3:]))  # padding untouched
    assert torch.equal(noisy.mask, text.mask)
    # noise / (0.5 x the caption's own RMS) is standard normal
    tok_rms = text.tokens[:, :3].pow(2).mean((1, 2), keepdim=True).sqrt()
    pool_rms = text.pooled.pow(2).mean(1, keepdim=True).sqrt()
    assert (d_tok[:, :3] / (0.5 * tok_rms)).std() == pytest.approx(1.0, rel=0.05)
    assert (d_pool / (0.5 * pool_rms)).std() == pytest.approx(1.0, rel=0.05)
    assert (d_pool / (0.5 * pool_rms)).mean() == pytest.approx(0.0, abs=0.05)


def test_caption_noise_is_training_only_and_off_by_default(monkeypatch):
    """With the default 0 the loss draws exactly what it drew before; with noise the model is
    conditioned on a perturbed caption (training only: sampling never calls the loss)."""
    seen = []
    original = jepat_module.JEPAT.condition

    def spy(self, t, drop):
        seen.append(t.tokens.clone())
        return original(self, t, drop)

    monkeypatch.setattr(jepat_module.JEPAT, "condition", spy)
    text, x = random_text(4), torch.randn(4, SEQ_LEN, TOKEN_DIM)
    losses = []
    for noise in (0.0, 0.0, 1.0):
        model = tiny_model().train()
        torch.manual_seed(1)
        losses.append(
            float(
                JEPATLoss(caption_noise=noise)(
                    model, EMATarget(copy.deepcopy(model)), x, text, torch.Generator().manual_seed(0)
                )["loss"]
            )
        )
    assert losses[0] == losses[1] != losses[2]
    assert torch.equal(seen[0], text.tokens) and not torch.equal(seen[4], text.tokens)  # model, EMA per run
    with pytest.raises(ValueError, match="caption_noise"):
        JEPATLoss(caption_noise=-1.0)
