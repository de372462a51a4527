import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from ddpm.diffusion.gaussian import Diffusion, Loss, Objective, Variance
from ddpm.diffusion.sampling import ancestral_coefficients, p_sample, p_sample_loop
from ddpm.diffusion.schedules import build_schedule


@pytest.fixture
def schedule(compose_cfg):
    cfg = compose_cfg("train", ["schedule=cosine"])
    return build_schedule(cfg.schedule, 100)


def q_sample(schedule, x0, t, noise):
    return Diffusion(schedule).q_sample(x0, t, noise)


def p_losses(model, schedule, x0, t, noise, loss, objective=Objective.eps, min_snr_gamma=0.0):
    diffusion = Diffusion(schedule, objective, loss, min_snr_gamma)
    return diffusion.training_losses(model, x0, t, noise)["loss"].mean()


def make_denoiser(model, schedule, objective, clip_x0):
    return Diffusion(schedule, objective).denoiser(model, clip_x0)


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

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append(x)
        self.labels = labels
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
    distances = (Loss.l1, Loss.l2, Loss.huber)  # kl is no distance: tests/test_likelihood.py
    values = {loss: p_losses(Constant(pred), schedule, x0, t, noise, loss).item() for loss in distances}
    assert values == {Loss.l1: 3.0, Loss.l2: 9.0, Loss.huber: 2.5}


def test_p_sample_is_algorithm_2_line_for_line(schedule):
    # x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t / sqrt(1 - abar_t) eps_theta) + sigma_t z, sigma_t^2 = beta~_t
    t = 30
    x_t = torch.randn(5, 1, 4, 4)
    eps = torch.randn_like(x_t)
    denoise = make_denoiser(Constant(eps), schedule, Objective.eps, clip_x0=False)
    abar = schedule.alphas_cumprod.double()
    coefficients = torch.tensor(ancestral_coefficients(abar[t].item(), abar[t - 1].item(), Variance.small))
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
    coefficients = torch.tensor(
        ancestral_coefficients(schedule.alphas_cumprod[0].item(), 1.0, Variance.small)
    )
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
    diffusion = Diffusion(schedule, objective)
    x0_hat, eps_hat = diffusion.predict_x0_eps(x_t, t, diffusion.target(x0, t, noise))
    torch.testing.assert_close(x0_hat, x0, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(eps_hat, noise, rtol=1e-3, atol=1e-3)


def test_v_target_closed_form(schedule):
    x0, noise, t = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0), torch.tensor([40])
    a, s = schedule.sqrt_alphas_cumprod[40], schedule.sqrt_one_minus_alphas_cumprod[40]
    assert Diffusion(schedule, Objective.v).target(x0, t, noise).item() == pytest.approx(
        (2 * a - s).item(), rel=1e-6
    )


def test_clip_x0_keeps_the_pair_consistent(schedule):
    x_t = torch.full((1, 1, 2, 2), 3.0)
    t = torch.tensor([5])
    denoise = make_denoiser(Constant(torch.zeros_like(x_t)), schedule, Objective.eps, clip_x0=True)
    x0, eps, _ = denoise(x_t, t)
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
    torch.testing.assert_close(Diffusion(schedule, objective, min_snr_gamma=5.0).snr_weight(t), expected)
    assert snr[0] > 5 > snr[-1]  # the clip is active at small t only


def test_p_losses_applies_the_weights_per_image(schedule):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    pred = torch.randn_like(x0)
    t = torch.tensor([0, 30, 99])
    value = p_losses(Constant(pred), schedule, x0, t, noise, Loss.l2, Objective.eps, min_snr_gamma=5.0)
    per_image = ((pred - noise) ** 2).flatten(1).mean(1)
    expected = (per_image * Diffusion(schedule, min_snr_gamma=5.0).snr_weight(t)).mean()
    # two summation orders of 48 non-negative float32 terms differ by at most 2 * 47 * 2^-24 ~ 5.6e-6
    assert value.item() == pytest.approx(expected.item(), rel=6e-6)


def posterior_by_bayes(schedule, x0, x_t, t):
    """q(x_{t-1} | x_t, x_0) from q(x_t | x_{t-1}) q(x_{t-1} | x_0), a product of two Gaussians in
    x_{t-1}, in float64 from the betas: precision 1 / (beta_t / alpha_t) + 1 / (1 - abar_{t-1}). (Not from
    the float32 abar: 1 - abar_{t-1} near t = 1 is ~1e-4, where float32's abar keeps 3 digits of it.)"""
    betas = schedule.betas.double()
    alphas = 1 - betas
    alpha, beta = alphas[t], betas[t]
    abar_prev = torch.cumprod(alphas, 0)[t - 1]
    var = 1 / (alpha / beta + 1 / (1 - abar_prev))
    mean = var * (alpha.sqrt() / beta * x_t.double() + abar_prev.sqrt() / (1 - abar_prev) * x0.double())
    return mean, var


@pytest.mark.parametrize("t", [1, 2, 40, 99])
def test_the_posterior_is_bayes_rule_on_the_two_forward_gaussians(schedule, t):
    x0, x_t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    mean, var = Diffusion(schedule).q_posterior_mean_variance(x0, x_t, torch.full((3,), t))
    want_mean, want_var = posterior_by_bayes(schedule, x0, x_t, t)
    # float32 coefficients of size <= 1 applied to unit-scale values: a few ulps of 1
    torch.testing.assert_close(mean, want_mean.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(var.flatten(), want_var.float().expand(3), rtol=1e-5, atol=0)


def test_the_posterior_at_t0_is_x0_itself(schedule):
    x0, x_t = torch.randn(2, 1, 4, 4), torch.randn(2, 1, 4, 4)
    mean, var = Diffusion(schedule).q_posterior_mean_variance(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert var.abs().max() == 0


@pytest.mark.parametrize("variance", [Variance.small, Variance.large])  # learned: test_learned_variance.py
def test_p_mean_variance_is_the_ancestral_step_of_the_sampler(schedule, variance):
    # with every step visited the sampler's step is N(posterior mean at x0_hat, its variance)
    t = 30
    x_t = torch.randn(5, 1, 4, 4)
    eps = torch.randn_like(x_t)
    diffusion = Diffusion(schedule)
    denoise = diffusion.denoiser(Constant(eps), clip_x0=False)
    tt = torch.full((5,), t)
    mean, var, _ = diffusion.p_mean_variance(denoise, x_t, tt, variance)
    abar = schedule.alphas_cumprod.double()
    c = torch.tensor(ancestral_coefficients(abar[t].item(), abar[t - 1].item(), variance))
    g = torch.Generator().manual_seed(0)
    step = p_sample(denoise, x_t, tt, c.float(), g, False)
    z = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(step, mean + var.sqrt() * z, rtol=1e-4, atol=1e-5)
    want = schedule.posterior_variance[t] if variance is Variance.small else schedule.betas[t]
    torch.testing.assert_close(var.flatten(), want.expand(5))


def test_the_large_variance_takes_the_posterior_one_at_t0(schedule):
    diffusion, x = Diffusion(schedule), torch.randn(2, 1, 4, 4)
    denoise = diffusion.denoiser(Constant(torch.zeros_like(x)), clip_x0=False)
    _, var, _ = diffusion.p_mean_variance(denoise, x, torch.zeros(2, dtype=torch.long), Variance.large)
    torch.testing.assert_close(var.flatten(), schedule.posterior_variance[1].expand(2))


def test_the_sampler_reads_the_variance_enum_and_its_name_alike(schedule):
    model = Constant(torch.zeros(2, 1, 4, 4))
    denoise = make_denoiser(model, schedule, Objective.eps, clip_x0=False)
    ts, x_T = [60, 30, 0], torch.randn(2, 1, 4, 4)
    draw = {
        v: p_sample_loop(denoise, schedule, x_T, ts, torch.Generator().manual_seed(0), variance=v)
        for v in (Variance.small, "small", Variance.large, "large")
    }
    assert torch.equal(draw[Variance.small], draw["small"]) and torch.equal(
        draw[Variance.large], draw["large"]
    )
    assert not torch.equal(draw[Variance.small], draw[Variance.large])


def test_the_loss_is_a_dict_of_per_image_terms(schedule):
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    terms = Diffusion(schedule).training_losses(
        Constant(torch.zeros_like(x0)), x0, torch.tensor([0, 5, 9]), noise
    )
    assert set(terms) == {"loss"} and terms["loss"].shape == (3,)
    torch.testing.assert_close(terms["loss"], (noise**2).flatten(1).mean(1))


def test_labels_reach_the_network_in_training_and_sampling(schedule):
    x0, labels = torch.randn(3, 1, 4, 4), torch.tensor([2, 0, 1])
    model = Constant(torch.zeros_like(x0))
    Diffusion(schedule).training_losses(model, x0, torch.tensor([0, 5, 9]), torch.randn_like(x0), labels)
    assert model.labels is labels
    Diffusion(schedule).denoiser(model, clip_x0=True, labels=labels)(x0, torch.tensor([0, 5, 9]))
    assert model.labels is labels


def test_the_diffusion_of_a_config_is_the_one_its_keys_name(compose_cfg):
    cfg = compose_cfg(
        "train", ["objective=v", "loss=l1", "min_snr_gamma=5", "offset_noise=0.1", "timesteps=30"]
    )
    diffusion = Diffusion.from_config(cfg)
    assert (diffusion.objective, diffusion.loss, diffusion.timesteps) == (Objective.v, Loss.l1, 30)
    assert (diffusion.min_snr_gamma, diffusion.offset_noise) == (5.0, 0.1)
    # a checkpoint's plain values build the same one; a version 1 file's missing keys take the old defaults
    from ddpm.training.rundir.plan import plain_config

    plain = Diffusion.from_config(OmegaConf.create(plain_config(cfg)))
    assert plain.objective is Objective.v and torch.equal(plain.schedule.betas, diffusion.schedule.betas)
    old = OmegaConf.create(
        {k: v for k, v in plain_config(cfg).items() if k not in ("objective", "min_snr_gamma")}
    )
    assert Diffusion.from_config(old).objective is Objective.eps


def test_offset_noise_adds_one_draw_per_image_and_channel(schedule):
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    plain = Diffusion(schedule).noise((2, 3, 4, 4), g1, torch.device("cpu"))
    offset = Diffusion(schedule, offset_noise=0.5).noise((2, 3, 4, 4), g2, torch.device("cpu"))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift)) and shift.abs().min() > 0
