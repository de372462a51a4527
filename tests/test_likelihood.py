"""The variational bound (diffusion/likelihood.py) against closed forms: the discretized Gaussian against
the normal CDF on the bins, the Gaussian KL against torch.distributions, and the whole bound on a one-image
data set with a network that knows the true noise, where every term has a known value."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributions import Normal, kl_divergence

from ddpm.diffusion.distributions import LN2, discretized_gaussian_log_likelihood, normal_kl
from ddpm.diffusion.gaussian import Diffusion, Loss, Objective, Variance
from ddpm.diffusion.likelihood import calc_bpd, prior_bpd
from ddpm.diffusion.schedules import Schedule, linear_betas

LEVELS = torch.arange(256, dtype=torch.float64) / 255 * 2 - 1  # the 8-bit grid in [-1, 1]


def test_normal_kl_is_torch_distributions_kl():
    g = torch.Generator().manual_seed(0)
    m1, m2 = (
        torch.randn(1000, generator=g, dtype=torch.float64),
        torch.randn(1000, generator=g, dtype=torch.float64),
    )
    lv1, lv2 = (
        torch.randn(1000, generator=g, dtype=torch.float64),
        torch.randn(1000, generator=g, dtype=torch.float64),
    )
    expected = kl_divergence(Normal(m1, (0.5 * lv1).exp()), Normal(m2, (0.5 * lv2).exp()))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean,std", [(0.0, 0.01), (0.3, 0.1), (-0.9, 0.003), (0.999, 0.5), (-1.2, 2.0)])
def test_discretized_gaussian_is_the_normal_cdf_on_the_bins(mean, std):
    x = LEVELS
    m, log_scale = torch.full_like(x, mean), torch.full_like(x, math.log(std))
    got = discretized_gaussian_log_likelihood(x, m, log_scale).exp()
    cdf = Normal(torch.tensor(mean, dtype=torch.float64), torch.tensor(std, dtype=torch.float64)).cdf
    expected = cdf(x + 1 / 255) - cdf(x - 1 / 255)
    expected[0] = cdf(x[0] + 1 / 255)  # the bottom edge bin takes the lower tail
    expected[-1] = 1 - cdf(x[-1] - 1 / 255)  # the top edge bin the upper one
    expected[1:-1] = expected[1:-1].clamp(min=1e-12)  # middle bins are floored before the log; edges exact
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-15)
    assert got.sum().item() == pytest.approx(1.0, abs=1e-9)  # a distribution over the 256 levels


def test_discretized_gaussian_keeps_far_bins_in_float32():
    """A middle bin many standard deviations above the mean: its mass is computed on the side where it
    does not cancel, so float32 gives the log of ~1e-6, not of 0 clamped to 1e-12."""
    x = torch.tensor([0.5], dtype=torch.float32)
    mean, std = torch.tensor([0.0]), 0.1  # 5 sigma away: both CDFs round to 1 in float32
    got = discretized_gaussian_log_likelihood(x, mean, torch.tensor([math.log(std)]))
    d = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(std, dtype=torch.float64))
    expected = math.log(float(d.cdf(torch.tensor(0.5 + 1 / 255)) - d.cdf(torch.tensor(0.5 - 1 / 255))))
    assert got.item() == pytest.approx(expected, rel=1e-4)


class TrueNoise(nn.Module):
    """A network that outputs the true noise of a data set of one image: eps = (x_t - a x_0) / s."""

    def __init__(self, diffusion: Diffusion, x0: torch.Tensor) -> None:
        super().__init__()
        self.diffusion, self.x0 = diffusion, x0

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        s = self.diffusion.schedule
        a = s.sqrt_alphas_cumprod[t].view(-1, 1, 1, 1).double()
        sd = s.sqrt_one_minus_alphas_cumprod[t].view(-1, 1, 1, 1).double()
        return ((x_t.double() - a * self.x0.double()) / sd).float()


def one_image(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return LEVELS[torch.randint(0, 256, (1, 1, 4, 4), generator=g)].float()  # on the 8-bit grid


def decoder_nll_bits(x0: torch.Tensor, var: float) -> float:
    """-log p(x_0 | x_1) in bits/dim when the decoder's mean is x_0 itself (what the true noise gives at
    t = 0), from the normal CDF in float64."""
    d = Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(math.sqrt(var), dtype=torch.float64))
    x = x0.double().flatten()
    mid = d.cdf(torch.tensor(1 / 255)) - d.cdf(torch.tensor(-1 / 255))
    edge = d.cdf(torch.tensor(1 / 255))  # the whole tail beyond the edge bin, on the far side of the mean
    p = torch.where(x.abs() > 0.999, edge, mid)
    return float(-p.log().mean()) / LN2


def prior_bits(diffusion: Diffusion, x0: torch.Tensor) -> float:
    abar = float(diffusion.schedule.alphas_cumprod.double()[-1])
    x = x0.double().flatten()
    # KL(N(sqrt(abar) x, 1 - abar) || N(0, 1)) per dimension
    kl = 0.5 * (-math.log(1 - abar) + (1 - abar) + abar * x**2 - 1)
    return float(kl.mean()) / LN2


@pytest.mark.parametrize("timesteps", [10, 200])
def test_bound_of_the_true_noise_with_the_small_variance(timesteps):
    """Every middle KL term is 0: the model's posterior is q's, mean and variance. What is left is the prior
    and the decoder term, both in closed form."""
    diffusion = Diffusion(Schedule.from_betas(linear_betas(timesteps, 1e-4, 0.02)), Objective.eps)
    x0 = one_image()
    denoise = diffusion.denoiser(TrueNoise(diffusion, x0), clip_x0=True)
    bound = calc_bpd(
        diffusion, denoise, x0.expand(3, -1, -1, -1), Variance.small, torch.Generator().manual_seed(0)
    )
    var = float(diffusion.schedule.posterior_variance.double()[1])  # beta~_1 stands in at t = 0
    assert bound.decoder_bpd.tolist() == pytest.approx([decoder_nll_bits(x0, var)] * 3, rel=1e-4)
    assert bound.prior_bpd.tolist() == pytest.approx([prior_bits(diffusion, x0)] * 3, rel=1e-5)
    middle = bound.bpd - bound.prior_bpd - bound.decoder_bpd
    assert middle.abs().max().item() < 1e-4  # each KL ~ (mean error)^2 / var, float32's rounding only


@pytest.mark.parametrize("timesteps", [10, 200])
def test_bound_of_the_true_noise_with_the_large_variance(timesteps):
    """With beta_t as the variance, the means still agree and KL_t = (log(beta_t / beta~_t) + beta~_t /
    beta_t - 1) / 2 per dimension: a bound that forgot the middle terms would miss their sum."""
    diffusion = Diffusion(Schedule.from_betas(linear_betas(timesteps, 1e-4, 0.02)), Objective.eps)
    x0 = one_image(1)
    denoise = diffusion.denoiser(TrueNoise(diffusion, x0), clip_x0=True)
    bound = calc_bpd(
        diffusion, denoise, x0.expand(2, -1, -1, -1), Variance.large, torch.Generator().manual_seed(0)
    )
    betas = linear_betas(timesteps, 1e-4, 0.02).double()
    abar = torch.cumprod(1 - betas, 0)
    tilde = betas[1:] * (1 - abar[:-1]) / (1 - abar[1:])  # beta~_t for t = 1 .. T-1 (0-based)
    kl = 0.5 * (torch.log(betas[1:] / tilde) + tilde / betas[1:] - 1)
    middle = float(kl.sum()) / LN2
    assert middle > 0.01  # large enough for a forgotten sum to fail the test
    decoder = decoder_nll_bits(x0, float(tilde[0]))  # beta~_1 at t = 0 for the large variance too
    expected = middle + decoder + prior_bits(diffusion, x0)
    assert bound.bpd.tolist() == pytest.approx([expected] * 2, rel=1e-4)


def test_prior_term_of_the_default_schedule():
    """At T = 200 (the default job's linear schedule) the chain's end keeps sqrt(abar_T) = 0.36 of the
    image, and the prior term is far from negligible."""
    diffusion = Diffusion(Schedule.from_betas(linear_betas(200, 1e-4, 0.02)), Objective.eps)
    x0 = -torch.ones(1, 1, 8, 8)  # a black image: x^2 = 1 everywhere
    got = prior_bpd(diffusion, x0).item()
    assert got == pytest.approx(prior_bits(diffusion, x0), rel=1e-5)
    assert 0.05 < got < 0.15


# ------------------------------------------------------------------------------- the bound as the loss
@pytest.mark.parametrize("variance", [Variance.small, Variance.large])
def test_loss_kl_is_the_weighted_noise_error_of_ho_et_al(variance):
    """loss=kl at t > 0 with a fixed variance sigma_t^2 is T KL per dimension, in bits: beta_t^2 / (2
    sigma_t^2 alpha_t (1 - abar_t)) |eps - eps_hat|^2 (Ho et al. eq. 8 through eq. 10: their true
    bound), plus, where sigma_t^2 is not the posterior's beta~_t, the constant (log(sigma_t^2 / beta~_t)
    + beta~_t / sigma_t^2 - 1) / 2 of two Gaussians' variances."""
    T = 50
    diffusion = Diffusion(
        Schedule.from_betas(linear_betas(T, 1e-4, 0.02)), Objective.eps, Loss.kl, bound_variance=variance
    )
    s = diffusion.schedule
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(4, 1, 6, 6, generator=g) * 2 - 1, torch.randn(4, 1, 6, 6, generator=g)
    eps_hat = torch.randn(4, 1, 6, 6, generator=g)
    t = torch.tensor([1, 7, 30, 49])
    loss = diffusion.training_losses(lambda *_: eps_hat, x0, t, noise)["loss"]
    beta = s.betas[t].double()
    sigma2 = (s.posterior_variance if variance is Variance.small else s.betas)[t].double()
    weight = beta**2 / (2 * sigma2 * (1 - beta) * (1 - s.alphas_cumprod[t].double()))
    posterior = s.posterior_variance[t].double()
    mismatch = 0.5 * (torch.log(sigma2 / posterior) + posterior / sigma2 - 1)
    nats = weight * (noise - eps_hat).double().pow(2).flatten(1).mean(1) + mismatch
    expected = T * nats / math.log(2)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-4, atol=0)


def test_loss_kl_trains_a_learn_sigma_model_s_mean_and_variance():
    """Unlike the hybrid loss, whose L_vlb sees the mean detached, loss=kl reaches both halves."""
    diffusion = Diffusion(
        Schedule.from_betas(linear_betas(20, 1e-4, 0.02)),
        Objective.eps,
        Loss.kl,
        learn_sigma=True,
        bound_variance=Variance.learned,
    )
    output = torch.zeros(2, 2, 4, 4, requires_grad=True)
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    terms = diffusion.training_losses(lambda *_: output, x0, torch.tensor([0, 5]), torch.randn(2, 1, 4, 4))
    assert set(terms) == {"loss"}
    terms["loss"].sum().backward()
    assert output.grad[:, 0].abs().sum() > 0 and output.grad[:, 1].abs().sum() > 0
