import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.diffusion.forward import (
    Loss,
    Objective,
    make_denoiser,
    p_losses,
    predict_x0_eps,
    q_sample,
    snr_weight,
    target,
)
from ddpm.diffusion.sampling import ancestral_coefficients, p_sample, p_sample_loop
from ddpm.diffusion.schedules import build_schedule


@pytest.fixture
def schedule(compose_cfg):
    cfg = compose_cfg("train", ["schedule=cosine"])
    return build_schedule(cfg.schedule, 100)


@pytest.mark.parametrize("t", [0, 1, 17, 50, 99])
def test_q_sample_equals_the_product_of_one_step_transitions(schedule, t):
    # Chaining q(x_s | x_{s-1}) = N(sqrt(1 - beta_s) x_{s-1}, beta_s I) from s = 1 to t + 1 gives
    # N(m x_0, v I) with m = prod sqrt(alpha_s) and v = 1 - prod alpha_s.
    m, v = torch.tensor(1.0, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64)
    for beta in schedule.betas[: t + 1].double():
        m, v = (1 - beta).sqrt() * m, (1 - beta) * v + beta
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, torch.full((3,), t), noise)
    torch.testing.assert_close(x_t, (m * x0 + v.sqrt() * noise).float(), rtol=1e-5, atol=1e-5)


def test_q_sample_moments_by_monte_carlo(schedule):
    t = 40
    x0 = torch.full((20000, 1, 1, 1), 0.7)
    x_t = q_sample(schedule, x0, torch.full((20000,), t), torch.randn_like(x0))
    abar = schedule.alphas_cumprod[t]
    assert x_t.mean().item() == pytest.approx(0.7 * abar.sqrt().item(), abs=0.02)
    assert x_t.var().item() == pytest.approx((1 - abar).item(), abs=0.02)


class Constant(nn.Module):
    """A 'model' that predicts a fixed tensor, to check the objective against torch.nn.functional."""

    def __init__(self, prediction: torch.Tensor) -> None:
        super().__init__()
        self.prediction = prediction
        self.seen: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.seen.append(x)
        return self.prediction


@pytest.mark.parametrize(
    ("loss", "reference"),
    [(Loss.l1, F.l1_loss), (Loss.l2, F.mse_loss), (Loss.huber, F.smooth_l1_loss)],
)
def test_p_losses_match_torch_functional(schedule, loss, reference):
    x0 = torch.randn(4, 3, 8, 8)
    noise = torch.randn_like(x0) * 2  # large enough that huber's linear part is used too
    prediction = torch.randn_like(x0)
    t = torch.tensor([0, 5, 50, 99])
    model = Constant(prediction)
    value = p_losses(model, schedule, x0, t, noise, loss)
    # the same 768 float32 terms summed in two orders (per image, then over images; or all at once):
    # each is within 767 * 2^-24 of the exact sum of these non-negative terms, so they differ by at most
    # 2 * 767 * 2^-24 ~ 9.1e-5 of it, whatever the CPU's kernels do
    assert value.item() == pytest.approx(reference(prediction, noise).item(), rel=1e-4)
    torch.testing.assert_close(model.seen[0], q_sample(schedule, x0, t, noise))


def test_huber_differs_from_l1_and_l2(schedule):
    x0, noise, pred = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([1, 2])
    values = {loss: p_losses(Constant(pred), schedule, x0, t, noise, loss).item() for loss in Loss}
    assert values == {Loss.l1: 3.0, Loss.l2: 9.0, Loss.huber: 2.5}


def test_p_sample_is_algorithm_2_line_for_line(schedule):
    # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta) + sigma_t z, sigma_t^2 = beta~_t
    t = 30
    x_t = torch.randn(5, 1, 4, 4)
    eps = torch.randn_like(x_t)
    denoise = make_denoiser(Constant(eps), schedule, Objective.eps, clip_x0=False)
    abar = schedule.alphas_cumprod.double()
    coefficients = torch.tensor(ancestral_coefficients(abar[t].item(), abar[t - 1].item(), "small"))
    out = p_sample(denoise, x_t, torch.full((5,), t), coefficients, torch.Generator().manual_seed(0), False)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    beta, alpha = schedule.betas[t], schedule.alphas[t]
    expected = (x_t - beta / (1 - abar[t]).sqrt().float() * eps) / alpha.sqrt() + schedule.posterior_variance[
        t
    ].sqrt() * z
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_last_step_adds_no_noise(schedule):
    x = torch.randn(2, 1, 4, 4)
    denoise = make_denoiser(Constant(torch.randn_like(x)), schedule, Objective.eps, clip_x0=False)
    coefficients = torch.tensor(ancestral_coefficients(schedule.alphas_cumprod[0].item(), 1.0, "small"))
    t = torch.zeros(2, dtype=torch.long)
    a = p_sample(denoise, x, t, coefficients, torch.Generator().manual_seed(1), True)
    b = p_sample(denoise, x, t, coefficients, torch.Generator().manual_seed(2), True)
    torch.testing.assert_close(a, b)


def test_p_sample_loop_visits_every_step_and_clips(schedule):
    model = Constant(torch.zeros(2, 1, 4, 4))
    denoise = make_denoiser(model, schedule, Objective.eps, clip_x0=False)
    ts = list(range(schedule.timesteps - 1, -1, -1))
    x = p_sample_loop(denoise, schedule, torch.randn(2, 1, 4, 4) * 10, ts, torch.Generator().manual_seed(0))
    assert len(model.seen) == schedule.timesteps
    assert x.min() >= -1 and x.max() <= 1


@pytest.mark.parametrize("objective", list(Objective))
def test_each_objective_inverts_to_x0_and_eps(schedule, objective):
    x0 = torch.randn(4, 3, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 10, 50, 99])
    x_t = q_sample(schedule, x0, t, noise)
    x0_hat, eps_hat = predict_x0_eps(objective, schedule, x_t, t, target(objective, schedule, x0, t, noise))
    torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-3, atol=1e-3)


def test_v_target_closed_form(schedule):
    x0, noise, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([40])
    a, s = schedule.sqrt_alphas_cumprod[40], schedule.sqrt_one_minus_alphas_cumprod[40]
    assert target(Objective.v, schedule, x0, t, noise).item() == pytest.approx((2 * a - s).item(), rel=1e-6)


def test_clip_x0_keeps_the_pair_consistent(schedule):
    x_t = torch.full((1, 1, 2, 2), 3.0)
    t = torch.tensor([5])
    denoise = make_denoiser(Constant(torch.zeros_like(x_t)), schedule, Objective.eps, clip_x0=True)
    x0, eps = denoise(x_t, t)
    assert x0.max().item() == 1.0
    torch.testing.assert_close(q_sample(schedule, x0, t, eps), x_t)


@pytest.mark.parametrize("objective", list(Objective))
def test_min_snr_weights(schedule, objective):
    t = torch.tensor([0, 30, 99])
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    expected = {
        Objective.eps: torch.minimum(snr, torch.tensor(5.0)) / snr,
        Objective.x0: torch.minimum(snr, torch.tensor(5.0)),
        Objective.v: torch.minimum(snr, torch.tensor(5.0)) / (snr + 1),
    }[objective]
    torch.testing.assert_close(snr_weight(objective, schedule, t, 5.0), expected)
    assert snr[0] > 5 > snr[-1]  # the clip is active at small t only


def test_p_losses_applies_the_weights_per_image(schedule):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    pred = torch.randn_like(x0)
    t = torch.tensor([0, 30, 99])
    value = p_losses(Constant(pred), schedule, x0, t, noise, Loss.l2, Objective.eps, min_snr_gamma=5.0)
    per_image = ((pred - noise) ** 2).flatten(1).mean(1)
    expected = (per_image * snr_weight(Objective.eps, schedule, t, 5.0)).mean()
    # two summation orders of 48 non-negative float32 terms differ by at most 2 * 47 * 2^-24 ~ 5.6e-6
    assert value.item() == pytest.approx(expected.item(), rel=6e-6)
