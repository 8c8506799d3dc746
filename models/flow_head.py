"""Per-token flow-matching head: an MLP with adaLN conditioned on (t, z_i), its loss and its ODE.

Convention (rectified flow): x_t = t * x + (1 - t) * eps, t in [0, 1], eps ~ N(0, I);
the head predicts the velocity dx_t/dt = x - eps. Sampling integrates from pure noise at t = 0
(scaled by the temperature) to data at t = 1.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn as nn

from models.blocks import TimestepEmbedder, modulate

SAMPLERS = ("euler", "heun")
PREDICTIONS = ("v", "x")


class AdaLNResBlock(nn.Module):
    """x + gate * MLP(adaLN(x; y)), with shift/scale/gate predicted from the condition y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [N,W], y [N,W] -> [N,W]."""
        shift, scale, gate = self.ada_ln(y).chunk(3, dim=-1)                           # [N,W] x3
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FlowHead(nn.Module):
    """v_psi(x_t, t, z): velocity of each token given the transformer's prediction z for it.

    Args:
        token_dim: size of one token (latent channels * patch**2).
        cond_dim: width of z (the transformer width).
        width: hidden width of the MLP.
        depth: number of adaLN residual blocks.
    """

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, prediction: str = "v",
                 min_one_minus_t: float = 0.05) -> None:
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown flow head prediction {prediction!r}; choose one of {PREDICTIONS}")
        self.token_dim = token_dim
        self.prediction = prediction
        self.min_one_minus_t = min_one_minus_t
        self.input_proj = nn.Linear(token_dim, width)
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.blocks = nn.ModuleList([AdaLNResBlock(width) for _ in range(depth)])
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))
        self.final_linear = nn.Linear(width, token_dim)

    def zero_init_modulation(self) -> None:
        """adaLN modulations and the output layer start at zero (each block starts as identity)."""
        for block in self.blocks:
            nn.init.zeros_(block.ada_ln[-1].weight)
            nn.init.zeros_(block.ada_ln[-1].bias)
        for layer in (self.final_ada_ln[-1], self.final_linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x_t [N,d], t [N], z [N,Dz] -> velocity [N,d].

        With ``prediction="x"`` the network outputs the clean token x_hat and the velocity is
        (x_hat - x_t) / (1 - t), with 1 - t clamped at ``min_one_minus_t``; the loss stays the
        velocity loss. For high-dimensional pixel patches this is much easier to learn than a
        direct velocity (clean patches lie near a low-dimensional set; noise does not)."""
        h = self.input_proj(x_t)                                                        # [N,W]
        y = self.time_embed(t) + self.cond_embed(z)                                     # [N,W]
        for block in self.blocks:
            h = block(h, y)                                                             # [N,W]
        shift, scale = self.final_ada_ln(y).chunk(2, dim=-1)                            # [N,W] x2
        out = self.final_linear(modulate(self.final_norm(h), shift, scale))             # [N,d]
        if self.prediction == "v":
            return out
        one_minus_t = (1 - t.float()).clamp(min=self.min_one_minus_t)[:, None]          # [N,1]
        return (out.float() - x_t.float()) / one_minus_t                                # [N,d]


def sample_time(n: int, device: torch.device, logit_mean: Optional[float] = None,
                logit_std: float = 1.0) -> torch.Tensor:
    """Training times t in (0, 1): uniform, or logit-normal sigmoid(N(logit_mean, logit_std))
    (a negative mean puts more weight on noisy inputs, where the head must rely on z)."""
    if logit_mean is None:
        return torch.rand(n, device=device, dtype=torch.float32)
    return torch.sigmoid(torch.randn(n, device=device, dtype=torch.float32) * logit_std + logit_mean)


def flow_matching_loss(head: FlowHead, x: torch.Tensor, z: torch.Tensor, repeat: int = 1,
                       t_logit_mean: Optional[float] = None, t_logit_std: float = 1.0) -> torch.Tensor:
    """Mean squared velocity error over the given tokens.

    Args:
        x: clean target tokens [N, d] (only the tokens the loss is taken over).
        z: transformer predictions for those tokens [N, Dz].
        repeat: draws of (t, eps) per token (MAR's diffusion_batch_mul).
        t_logit_mean / t_logit_std: logit-normal time sampling; None = uniform t.
    Returns: scalar loss (float32).
    """
    x = x.repeat(repeat, 1)                                                             # [rN,d]
    z = z.repeat(repeat, 1)                                                             # [rN,Dz]
    t = sample_time(x.shape[0], x.device, t_logit_mean, t_logit_std)                    # [rN]
    eps = torch.randn_like(x)                                                           # [rN,d]
    x_t = t[:, None] * x + (1 - t[:, None]) * eps                                       # [rN,d]
    v = head(x_t, t, z)                                                                 # [rN,d]
    return (v.float() - (x - eps).float()).pow(2).mean()


VelocityFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def integrate_flow(velocity: VelocityFn, noise: torch.Tensor, steps: int, sampler: str = "heun") -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (x = noise [N,d]) to t = 1 with ``steps`` steps.

    ``euler`` takes one velocity call per step; ``heun`` (second order, trapezoidal corrector)
    takes two. Returns x at t = 1, [N,d].
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown ODE sampler {sampler!r}; choose one of {SAMPLERS}")
    if steps < 1:
        raise ValueError(f"the flow ODE needs at least one step, got {steps}")
    x = noise
    n = x.shape[0]
    ts = torch.linspace(0.0, 1.0, steps + 1, device=x.device)
    for i in range(steps):
        t0, t1 = ts[i], ts[i + 1]
        h = t1 - t0
        v0 = velocity(x, t0.expand(n))
        if sampler == "euler":
            x = x + h * v0
        else:
            x_pred = x + h * v0
            v1 = velocity(x_pred, t1.expand(n))
            x = x + 0.5 * h * (v0 + v1)
    return x


def sample_tokens_from_head(head: FlowHead, z: torch.Tensor, temperature: float, steps: int,
                            sampler: str, guidance: Optional[torch.Tensor] = None,
                            generator: Optional[torch.Generator] = None,
                            noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Draw one token per row of z by integrating the head's ODE.

    Args:
        z: [N, Dz] conditional predictions, or [2N, Dz] (conditional rows first, then the
           null-condition rows) when ``guidance`` is given.
        temperature: scale of the initial noise (1 = the training distribution).
        guidance: [N] CFG scale per token; v = v_null + g * (v_cond - v_null).
        noise: [N, d] unit-variance starting noise drawn by the caller (then ``generator`` is unused).
    Returns: tokens [N, d].
    """
    n = z.shape[0] if guidance is None else z.shape[0] // 2
    if noise is None:
        noise = torch.randn(n, head.token_dim, device=z.device, generator=generator)            # [N,d]
    noise = noise.float() * temperature                                                          # [N,d]
    if guidance is None:
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return head(x, t, z).float()
    else:
        g = guidance[:, None].float()                                                   # [N,1]

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = head(torch.cat([x, x]), torch.cat([t, t]), z).float()                  # [2N,d]
            v_cond, v_null = v.chunk(2)
            return v_null + g * (v_cond - v_null)
    return integrate_flow(velocity, noise, steps, sampler)
