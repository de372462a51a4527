"""The variational bound of Ho et al. 2020 (eq. 5) in bits per dimension: the prior term
KL(q(x_T | x_0) || N(0, I)), a KL term KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for every t in between,
and the decoder term -log p(x_0 | x_1) under the discretized Gaussian of the 8-bit data. Each term is
estimated with one x_t per image per t, as improved-diffusion's ``calc_bpd_loop`` does."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ddpm.diffusion.gaussian import Denoiser, Diffusion, Variance
from ddpm.diffusion.schedules import extract

LN2 = math.log(2.0)
SQRT_HALF = math.sqrt(0.5)
# The data's 256 levels in [-1, 1]: bins of half-width 1/255 around each; beyond +-EDGE an image value is
# an edge level, whose bin takes the whole tail.
HALF_BIN = 1.0 / 255.0
EDGE = 0.999
MIN_PROB = 1e-12  # a bin's probability is floored here before its log, as improved-diffusion does


def normal_kl(
    mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor
) -> torch.Tensor:
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))) per element, in nats."""
    return 0.5 * (
        logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2) - 1.0
    )


def ndtr(x: torch.Tensor) -> torch.Tensor:
    """The standard normal CDF through erfc, which keeps its relative precision in the lower tail, where
    float32 torch.special.ndtr does not (ndtr(-5) is 4% off, ndtr(-6) is 0)."""
    return 0.5 * torch.special.erfc(-x * SQRT_HALF)


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor
) -> torch.Tensor:
    """log P(x) per element of x (on the 256-level grid in [-1, 1]) under N(mean, exp(log_scale)^2)
    discretized into bins of half-width 1/255, the two edge bins taking the tails beyond them."""
    inv_std = torch.exp(-log_scale)
    centered = x - mean
    upper, lower = inv_std * (centered + HALF_BIN), inv_std * (centered - HALF_BIN)
    log_cdf_upper = torch.special.log_ndtr(upper)  # the bottom edge bin: P(X < x + 1/255)
    log_sf_lower = torch.special.log_ndtr(-lower)  # the top edge bin: P(X > x - 1/255)
    # A middle bin's mass, taken on the side of the mean where it does not cancel to 0 in float32.
    mass = torch.where(
        centered > 0,
        ndtr(-lower) - ndtr(-upper),
        ndtr(upper) - ndtr(lower),
    )
    log_mid = torch.log(mass.clamp(min=MIN_PROB))
    return torch.where(x < -EDGE, log_cdf_upper, torch.where(x > EDGE, log_sf_lower, log_mid))


def mean_bits(nats: torch.Tensor) -> torch.Tensor:
    """Per-element nats -> bits per dimension of each image: the mean over all but the batch dim / ln 2."""
    return nats.flatten(1).mean(dim=1) / LN2


def prior_bpd(diffusion: Diffusion, x0: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T | x_0) || N(0, I)) of each image, in bits/dim: what the chain's end leaves of the image."""
    last = torch.full((x0.shape[0],), diffusion.timesteps - 1, device=x0.device, dtype=torch.long)
    s = diffusion.schedule
    mean = extract(s.sqrt_alphas_cumprod, last, x0.ndim) * x0
    logvar = torch.log(extract(1.0 - s.alphas_cumprod, last, x0.ndim)).expand_as(x0)
    zero = torch.zeros_like(x0)
    return mean_bits(normal_kl(mean, logvar, zero, zero))


def vb_terms_bpd(
    diffusion: Diffusion,
    denoise: Denoiser,
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: torch.Tensor,
    variance: Variance,
) -> torch.Tensor:
    """The bound's term at t of each image, in bits/dim: KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) for
    t > 0, the decoder's -log p(x_0 | x_1) at t = 0 (``t`` is the 0-based index, so t = 0 is Ho et al.'s
    t = 1)."""
    true_mean, _ = diffusion.q_posterior_mean_variance(x0, x_t, t)
    true_logvar = extract(diffusion.schedule.posterior_log_variance_clipped, t, x0.ndim)
    mean, _, _ = diffusion.p_mean_variance(denoise, x_t, t, variance)
    logvar = diffusion.model_log_variance(t, variance, x0.ndim)
    kl = mean_bits(normal_kl(true_mean, true_logvar, mean, logvar))
    decoder = -mean_bits(discretized_gaussian_log_likelihood(x0, mean, 0.5 * logvar))
    return torch.where(t == 0, decoder, kl)


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
        term = vb_terms_bpd(diffusion, denoise, x0, diffusion.q_sample(x0, t, noise), t, variance)
        total = total + term
        if step == 0:
            decoder = term
    prior = prior_bpd(diffusion, x0)
    return Bound(total + prior, prior, decoder)
