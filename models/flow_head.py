"""Per-token flow-matching head: an MLP with adaLN conditioned on (t, z_i), its loss and its ODE.

Convention (rectified flow): x_t = t * x + (1 - t) * eps, t in [0, 1], eps ~ N(0, I);
the head predicts the velocity dx_t/dt = x - eps. Sampling integrates from pure noise at t = 0
(scaled by the temperature) to data at t = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from models.blocks import TimestepEmbedder, modulate

ODE_SOLVERS = ("euler", "heun")
PREDICTIONS = ("v", "x")
Modulations = tuple[
    list[Sequence[torch.Tensor]], Sequence[torch.Tensor]
]  # per block (shift, scale, gate); final (shift, scale)


class AdaLNResBlock(nn.Module):
    """x + gate * MLP(adaLN(x; y)), with shift/scale/gate predicted from the condition y."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada_ln = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """x [N,W], y [N,W] -> [N,W]."""
        return self.modulated(x, self.ada_ln(y).chunk(3, dim=-1))

    def modulated(self, x: torch.Tensor, mods: Sequence[torch.Tensor]) -> torch.Tensor:
        """The block with its (shift, scale, gate) [N,W] x3 computed beforehand."""
        shift, scale, gate = mods
        return x + gate * self.mlp(modulate(self.norm(x), shift, scale))


class FlowHead(nn.Module):
    """v_psi(x_t, t, z): velocity of each token given the transformer's prediction z for it.

    Args:
        token_dim: size of one token (latent channels * patch**2).
        cond_dim: width of z (the transformer width).
        width: hidden width of the MLP.
        depth: number of adaLN residual blocks.
    """

    def __init__(
        self,
        token_dim: int,
        cond_dim: int,
        width: int,
        depth: int,
        prediction: str = "v",
        min_one_minus_t: float = 0.05,
    ) -> None:
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
        y = self.time_embed(t) + self.cond_embed(z)  # [N,W]
        one_minus_t = (1 - t.float()).clamp(min=self.min_one_minus_t)[:, None]  # [N,1]
        return self.velocity(x_t, self.modulations(y), one_minus_t)

    def modulations(self, y: torch.Tensor) -> Modulations:
        """Every adaLN modulation for the condition y [N,W] (time and z embedded): they depend on
        (t, z) only, not on x_t."""
        return ([block.ada_ln(y).chunk(3, dim=-1) for block in self.blocks], self.final_ada_ln(y).chunk(2, dim=-1))

    def velocity(self, x_t: torch.Tensor, mods: Modulations, one_minus_t: torch.Tensor) -> torch.Tensor:
        """The MLP on x_t [N,d] under precomputed modulations; one_minus_t [N,1] or [1,1]."""
        block_mods, (shift, scale) = mods
        h = self.input_proj(x_t)  # [N,W]
        for block, m in zip(self.blocks, block_mods):
            h = block.modulated(h, m)  # [N,W]
        out = self.final_linear(modulate(self.final_norm(h), shift, scale))  # [N,d]
        if self.prediction == "v":
            return out
        return (out.float() - x_t.float()) / one_minus_t  # [N,d]

    def prepare(self, z: torch.Tensor) -> VelocityFn:
        """velocity(x_t, t) for fixed z [N,Dz] and one flow time t (a float) for all rows, as the
        ODE solvers call it: z is embedded once, and the time embedding and the adaLN modulations
        (about 60% of the head's multiply-adds) once per distinct t. Heun evaluates every interior
        t twice (corrector, then the next predictor), so this halves their cost there."""
        z_emb = self.cond_embed(z)  # [N,W]
        cache: dict = {}

        def velocity(x_t: torch.Tensor, t: float) -> torch.Tensor:
            if t not in cache:
                if len(cache) >= 2:  # Heun needs t0 and t1
                    cache.pop(next(iter(cache)))
                y = self.time_embed(torch.full((1,), t, device=z.device)) + z_emb  # [N,W]
                cache[t] = self.modulations(y)
            one_minus_t = torch.full((1, 1), max(1.0 - t, self.min_one_minus_t), device=z.device)
            return self.velocity(x_t, cache[t], one_minus_t)

        return velocity


def sample_time(n: int, device: torch.device, logit_mean: float | None = None, logit_std: float = 1.0) -> torch.Tensor:
    """Training times t in (0, 1): uniform, or logit-normal sigmoid(N(logit_mean, logit_std))
    (a negative mean puts more weight on noisy inputs, where the head must rely on z)."""
    if logit_mean is None:
        return torch.rand(n, device=device, dtype=torch.float32)
    return torch.sigmoid(torch.randn(n, device=device, dtype=torch.float32) * logit_std + logit_mean)


def flow_matching_loss(
    head: FlowHead,
    x: torch.Tensor,
    z: torch.Tensor,
    repeat: int = 1,
    t_logit_mean: float | None = None,
    t_logit_std: float = 1.0,
) -> torch.Tensor:
    """Mean squared velocity error over the given tokens.

    Args:
        x: clean target tokens [N, d] (only the tokens the loss is taken over).
        z: transformer predictions for those tokens [N, Dz].
        repeat: draws of (t, eps) per token (MAR's diffusion_batch_mul).
        t_logit_mean / t_logit_std: logit-normal time sampling; None = uniform t.
    Returns: scalar loss (float32).
    """
    x = x.repeat(repeat, 1)  # [rN,d]
    z = z.repeat(repeat, 1)  # [rN,Dz]
    t = sample_time(x.shape[0], x.device, t_logit_mean, t_logit_std)  # [rN]
    eps = torch.randn_like(x)  # [rN,d]
    x_t = t[:, None] * x + (1 - t[:, None]) * eps  # [rN,d]
    v = head(x_t, t, z)  # [rN,d]
    return (v.float() - (x - eps).float()).pow(2).mean()


VelocityFn = Callable[[torch.Tensor, float], torch.Tensor]


def integrate_flow(velocity: VelocityFn, noise: torch.Tensor, steps: int, solver: str = "heun") -> torch.Tensor:
    """Integrate dx/dt = velocity(x, t) from t = 0 (x = noise [N,d]) to t = 1 with ``steps`` steps.

    ``t`` is one float for all rows. ``euler`` takes one velocity call per step; ``heun`` (second
    order, trapezoidal corrector) takes two. Returns x at t = 1, [N,d].
    """
    if solver not in ODE_SOLVERS:
        raise ValueError(f"unknown ODE solver {solver!r}; choose one of {ODE_SOLVERS}")
    if steps < 1:
        raise ValueError(f"the flow ODE needs at least one step, got {steps}")
    x = noise
    for i in range(steps):
        t0, t1 = i / steps, (i + 1) / steps
        h = t1 - t0
        v0 = velocity(x, t0)
        if solver == "euler":
            x = x + h * v0
        else:
            x_pred = x + h * v0
            v1 = velocity(x_pred, t1)
            x = x + 0.5 * h * (v0 + v1)
    return x


def sample_tokens_from_head(
    head: nn.Module,
    z: torch.Tensor,
    temperature: float,
    steps: int,
    solver: str,
    guidance: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Draw one token per row of z by integrating the head's ODE.

    Args:
        head: a FlowHead (or any module with ``token_dim`` and ``prepare(z) -> velocity(x, t)``).
        z: [N, Dz] conditional predictions, or [2N, Dz] (conditional rows first, then the
           null-condition rows) when ``guidance`` is given.
        temperature: scale of the initial noise (1 = the training distribution).
        guidance: [N] CFG scale per token; v = v_null + g * (v_cond - v_null).
        noise: [N, d] unit-variance starting noise drawn by the caller (then ``generator`` is unused).
    Returns: tokens [N, d].
    """
    n = z.shape[0] if guidance is None else z.shape[0] // 2
    if noise is None:
        noise = torch.randn(n, head.token_dim, device=z.device, generator=generator)  # [N,d]
    noise = noise.float() * temperature  # [N,d]
    head_velocity = head.prepare(z)
    if guidance is None:

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            return head_velocity(x, t).float()
    else:
        g = guidance[:, None].float()  # [N,1]

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            v = head_velocity(torch.cat([x, x]), t).float()  # [2N,d]
            v_cond, v_null = v.chunk(2)
            return v_null + g * (v_cond - v_null)

    return integrate_flow(velocity, noise, steps, solver)
