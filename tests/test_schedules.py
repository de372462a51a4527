import math

import pytest
import torch

from ddpm.diffusion.schedules import Schedule, build_schedule, cosine_betas, make_betas

SCHEDULES = ["linear", "quadratic", "sigmoid", "cosine"]


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("timesteps", [1, 10, 200, 1000])
def test_betas_are_monotone_and_in_unit_interval(compose_cfg, name, timesteps):
    cfg = compose_cfg("train", [f"schedule={name}"])
    betas = make_betas(cfg.schedule, timesteps)
    assert betas.shape == (timesteps,)
    assert torch.all(betas > 0) and torch.all(betas < 1)
    assert torch.all(betas[1:] >= betas[:-1])


@pytest.mark.parametrize("name", ["linear", "quadratic"])
def test_endpoints_are_beta_start_and_beta_end(compose_cfg, name):
    cfg = compose_cfg("train", [f"schedule={name}", "schedule.beta_start=0.001", "schedule.beta_end=0.03"])
    betas = make_betas(cfg.schedule, 50)
    assert betas[0].item() == pytest.approx(0.001)
    assert betas[-1].item() == pytest.approx(0.03)


def test_quadratic_is_linear_in_sqrt_beta(compose_cfg):
    cfg = compose_cfg("train", ["schedule=quadratic"])
    root = make_betas(cfg.schedule, 100).sqrt()
    torch.testing.assert_close(
        root[1:] - root[:-1], torch.full((99,), (root[1] - root[0]).item(), dtype=root.dtype)
    )


def test_sigmoid_follows_its_formula(compose_cfg):
    cfg = compose_cfg("train", ["schedule=sigmoid", "schedule.start=-3", "schedule.end=3"])
    betas = make_betas(cfg.schedule, 7)
    x = torch.linspace(-3, 3, 7, dtype=torch.float64)
    torch.testing.assert_close(betas, 1e-4 + (0.02 - 1e-4) / (1 + torch.exp(-x)))


def test_cosine_alphas_cumprod_follow_nichol_dhariwal():
    T, s = 1000, 0.008
    schedule = Schedule.from_betas(cosine_betas(T, s, max_beta=0.999))
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in [1, 10, 250, 500, 900]:  # away from the clipped end
        assert schedule.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-5)


def test_cosine_clips_at_max_beta():
    betas = cosine_betas(100, 0.008, max_beta=0.5)
    assert betas.max().item() == pytest.approx(0.5)
    assert betas[-1].item() == pytest.approx(0.5)


def test_derived_buffers(compose_cfg):
    cfg = compose_cfg("train")
    sched = build_schedule(cfg.schedule, 200)
    betas = make_betas(cfg.schedule, 200)
    abar = torch.cumprod(1 - betas, 0)
    torch.testing.assert_close(sched.alphas_cumprod, abar.float())
    torch.testing.assert_close(
        sched.sqrt_alphas_cumprod**2 + sched.sqrt_one_minus_alphas_cumprod**2, torch.ones(200)
    )
    torch.testing.assert_close(sched.alphas_cumprod_prev[1:], sched.alphas_cumprod[:-1])
    assert sched.alphas_cumprod_prev[0].item() == 1.0
    # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) * beta_t; beta~_1 = 0
    assert sched.posterior_variance[0].item() == 0.0
    t = 57
    expected = (1 - abar[t - 1]) / (1 - abar[t]) * betas[t]
    assert sched.posterior_variance[t].item() == pytest.approx(expected.item(), rel=1e-6)
    assert sched.timesteps == 200


@pytest.mark.parametrize("name", SCHEDULES)
def test_zero_terminal_snr_rescaling(compose_cfg, name):
    cfg = compose_cfg("train", [f"schedule={name}", "schedule.zero_terminal_snr=true", "objective=v"])
    plain = Schedule.from_betas(make_betas(compose_cfg("train", [f"schedule={name}"]).schedule, 200))
    rescaled = build_schedule(cfg.schedule, 200)
    assert rescaled.alphas_cumprod[-1].item() == 0.0
    assert rescaled.betas[-1].item() == 1.0
    assert rescaled.sqrt_alphas_cumprod[0].item() == pytest.approx(
        plain.sqrt_alphas_cumprod[0].item(), rel=1e-6
    )
    assert torch.all(rescaled.betas > 0) and torch.all(rescaled.betas <= 1)
    # Lin et al.: sqrt(abar) is shifted and scaled linearly, so it stays an affine image of the original
    a, b = plain.sqrt_alphas_cumprod.double(), rescaled.sqrt_alphas_cumprod.double()
    expected = (a - a[-1]) * a[0] / (a[0] - a[-1])
    torch.testing.assert_close(b, expected, rtol=1e-5, atol=1e-6)
