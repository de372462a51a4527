"""The variational bound of Ho et al. 2020 (eq. 5) in bits per dimension: the prior term
KL(q(x_T | x_0) || N(0, I)), a KL term KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for every t in between,
and the decoder term -log p(x_0 | x_1) under the discretized Gaussian of the 8-bit data. Each term is
estimated with one x_t per image per t, as improved-diffusion's ``calc_bpd_loop`` does."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ddpm.diffusion.distributions import mean_bits, normal_kl
from ddpm.diffusion.gaussian import Denoiser, Diffusion, Variance
from ddpm.diffusion.schedules import extract


def prior_bpd(diffusion: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) of each image, in bits/dim: what the chain's end leaves of the image."""
    last = torch.full((x0.shape[0],), diffusion.timesteps - 1, device=x0.device, dtype=torch.long)
    s = diffusion.schedule
    mean = extract(s.sqrt_alphas_cumprod, last, x0.ndim) * x0
    logvar = torch.log(extract(1.0 - s.alphas_cumprod, last, x0.ndim)).expand_as(x0)
    zero = torch.zeros_like(x0)
    return mean_bits(normal_kl(mean, logvar, zero, zero))


@dataclass(frozen=True)
class Bound:
    """The bound of each image of a batch, in bits/dim: in all, and its prior and decoder terms."""

    bpd: torch.Tensor
    prior_bpd: torch.Tensor
    decoder_bpd: torch.Tensor


@torch.no_grad()
def calc_bpd(
    diffusion: Diffusion,
    denoise: Denoiser,
    x0: torch.Tensor,
    variance: Variance,
    generator: torch.Generator,
) -> Bound:
    """The whole bound of each image of ``x0``: every one of the T terms, from t = T - 1 down to 0, each at
    one x_t drawn from q(x_t | x_0) with ``generator``, plus the prior term. Nothing is read back to the
    host: the sums stay on the device."""
    total = torch.zeros(x0.shape[0], device=x0.device)
    decoder = total
    for step in reversed(range(diffusion.timesteps)):
        t = torch.full((x0.shape[0],), step, device=x0.device, dtype=torch.long)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device)
        term = diffusion.vb_terms_bpd(denoise, x0, diffusion.q_sample(x0, t, noise), t, variance)
        total = total + term
        if step == 0:
            decoder = term
    prior = prior_bpd(diffusion, x0)
    return Bound(total + prior, prior, decoder)
