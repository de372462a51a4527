"""The two Gaussian quantities of the variational bound: the KL divergence between two normal
distributions, and the likelihood of 8-bit data under a normal distribution discretized into its 256 bins
(Ho et al. 2020, eq. 13), with the per-image mean in bits per dimension."""

from __future__ import annotations

import math

import torch

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
