import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import Loss
from ddpm.diffusion import p_losses, q_sample
from ddpm.sampling import p_sample, p_sample_loop
from ddpm.schedules import build_schedule


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
    assert value.item() == pytest.approx(reference(prediction, noise).item(), rel=1e-6)
    torch.testing.assert_close(model.seen[0], q_sample(schedule, x0, t, noise))


def test_huber_differs_from_l1_and_l2(schedule):
    x0, noise, pred = torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 3.0), torch.zeros(2, 1, 2, 2)
    t = torch.tensor([1, 2])
    values = {loss: p_losses(Constant(pred), schedule, x0, t, noise, loss).item() for loss in Loss}
    assert values == {Loss.l1: 3.0, Loss.l2: 9.0, Loss.huber: 2.5}


def test_p_sample_mean_is_the_posterior_mean_when_eps_is_exact(schedule):
    # With eps_theta = the true noise, Algorithm 2's mean equals mu~_t(x_t, x_0) of eq. 7.
    t = 30
    x0 = torch.randn(5, 1, 4, 4)
    noise = torch.randn_like(x0)
    x_t = q_sample(schedule, x0, torch.full((5,), t), noise)
    abar, abar_prev = schedule.alphas_cumprod[t], schedule.alphas_cumprod_prev[t]
    beta, alpha = schedule.betas[t], schedule.alphas[t]
    mu = abar_prev.sqrt() * beta / (1 - abar) * x0 + alpha.sqrt() * (1 - abar_prev) / (1 - abar) * x_t
    # Two draws with the same generator differ from mu by sigma_t z with the same z.
    out = p_sample(Constant(noise), schedule, x_t, t, torch.Generator().manual_seed(0))
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, mu + schedule.posterior_variance[t].sqrt() * z, rtol=1e-4, atol=1e-5)


def test_last_step_adds_no_noise(schedule):
    x = torch.randn(2, 1, 4, 4)
    eps = torch.randn_like(x)
    a = p_sample(Constant(eps), schedule, x, 0, torch.Generator().manual_seed(1))
    b = p_sample(Constant(eps), schedule, x, 0, torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b)


def test_p_sample_loop_visits_every_step_and_clips(schedule):
    model = Constant(torch.zeros(2, 1, 4, 4))
    x = p_sample_loop(model, schedule, torch.randn(2, 1, 4, 4) * 10, torch.Generator().manual_seed(0))
    assert len(model.seen) == schedule.timesteps
    assert x.min() >= -1 and x.max() <= 1
