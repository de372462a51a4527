"""Samplers: pure functions of (model, schedule, x_T, generator) that return x_0."""

from __future__ import annotations

import torch
from torch import nn

from ddpm.schedules import Schedule, extract


@torch.no_grad()
def p_sample(
    model: nn.Module,
    schedule: Schedule,
    x_t: torch.Tensor,
    t: int,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One step of Algorithm 2: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t/sqrt(1-abar_t) eps) + sigma_t z.

    sigma_t^2 is the posterior variance beta~_t ("fixed small"); the last step (t = 0) adds no noise.
    """
    tt = torch.full((x_t.shape[0],), t, device=x_t.device, dtype=torch.long)
    eps = model(x_t, tt)
    n = x_t.ndim
    coef = extract(schedule.betas, tt, n) / extract(schedule.sqrt_one_minus_alphas_cumprod, tt, n)
    mean = extract(schedule.sqrt_recip_alphas, tt, n) * (x_t - coef * eps)
    if t == 0:
        return mean
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + extract(schedule.posterior_variance, tt, n).sqrt() * z


@torch.no_grad()
def p_sample_loop(
    model: nn.Module,
    schedule: Schedule,
    x_T: torch.Tensor,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Algorithm 2 (ancestral sampling): run p_sample from t = T-1 down to 0, clip the result to [-1, 1]."""
    x = x_T
    for t in reversed(range(schedule.timesteps)):
        x = p_sample(model, schedule, x, t, generator)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def generate(
    model: nn.Module,
    schedule: Schedule,
    n: int,
    shape: tuple[int, int, int],
    seed: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """n images of ``shape`` = (C, H, W) in [-1, 1], drawn ``batch_size`` at a time.

    One generator, seeded once, supplies x_T and every step's noise: the same seed, n and batch size give
    the same images."""
    was_training = model.training
    model.eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        x_T = torch.randn((b, *shape), generator=generator, device=device)
        chunks.append(p_sample_loop(model, schedule, x_T, generator).cpu())
    model.train(was_training)
    return torch.cat(chunks)
