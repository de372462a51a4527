"""Learned variances and the hybrid loss (Nichol & Dhariwal 2021): the 2C-channel U-Nets, the learned range,
the loss against its terms computed with torch.distributions, the ancestral step against diffusers'
DDPMScheduler(variance_type="learned_range"), guidance, and the commands end to end."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY, compose
from omegaconf import OmegaConf
from torch.distributions import Normal, kl_divergence

from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion.gaussian import Diffusion, Objective, Variance, guided_output, resolve_variance
from ddpm.diffusion.sampling import ancestral_coefficients, learned_range, p_sample, sampling_timesteps
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.errors import ConfigError
from ddpm.models import build_model
from ddpm.training.loop import train

T = 50


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion(Schedule.from_betas(linear_betas(T, 1e-4, 0.02)), Objective.eps, learn_sigma=True)


@pytest.mark.parametrize("model", ["unet", "ho2020"])
def test_a_learn_sigma_unet_outputs_twice_the_channels(model):
    cfg = compose("train", [f"model={model}", "model.dim=32", "model.dim_mults=[1,2]"]).model
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([1, 7])
    assert build_model(cfg, 3, 8)(x, t).shape == (2, 3, 8, 8)
    assert build_model(cfg, 3, 8, learn_sigma=True)(x, t).shape == (2, 6, 8, 8)


def test_auto_means_the_models_own_variance():
    assert resolve_variance("auto", learn_sigma=True) is Variance.learned
    assert resolve_variance("auto", learn_sigma=False) is Variance.small
    assert resolve_variance("large", learn_sigma=True) is Variance.large
    with pytest.raises(
        ConfigError, match="ddpm_variance=learned needs a model trained with learn_sigma=true"
    ):
        resolve_variance("learned", learn_sigma=False)


def test_the_learned_range_runs_from_the_posterior_variance_to_beta(diffusion):
    s, t = diffusion.schedule, torch.tensor([0, 1, 30, T - 1])
    low = diffusion.model_log_variance(t, Variance.learned, 2, torch.zeros(4, 1))
    high = diffusion.model_log_variance(t, Variance.learned, 2, torch.ones(4, 1))
    half = diffusion.model_log_variance(t, Variance.learned, 2, torch.full((4, 1), 0.5))
    torch.testing.assert_close(low.flatten(), s.posterior_log_variance_clipped[t])  # beta~_1 at t = 0
    torch.testing.assert_close(high.flatten(), s.betas[t].log())
    torch.testing.assert_close(half, (low + high) / 2)


def fixed_output(out: torch.Tensor):
    return lambda x_t, t, labels=None: out


def test_the_hybrid_loss_is_l_simple_plus_lambda_t_times_the_bound_term(diffusion):
    """loss_vlb computed independently: the Gaussian KL of torch.distributions for t > 0 and the normal CDF
    on the bins at t = 0; the total is improved-diffusion's mse + vb * T / 1000 at vlb_weight 0.001."""
    g = torch.Generator().manual_seed(0)
    b = 6
    x0 = (torch.randint(0, 256, (b, 1, 4, 4), generator=g) / 255 * 2 - 1).float()
    noise = torch.randn(b, 1, 4, 4, generator=g)
    t = torch.tensor([0, 0, 1, 10, 30, T - 1])
    out = torch.randn(b, 2, 4, 4, generator=g) * 0.5
    terms = diffusion.training_losses(fixed_output(out), x0, t, noise)

    eps_hat, v = out[:, :1].double(), out[:, 1:].double()
    mse = ((eps_hat - noise.double()) ** 2).flatten(1).mean(1)
    # the schedule from its betas in float64 (1 - abar_0 = beta_0 = 1e-4 loses 3 digits from a float32 abar)
    betas = linear_betas(T, 1e-4, 0.02).double()
    abar = torch.cumprod(1 - betas, 0)
    abar_prev = torch.cat([torch.ones(1, dtype=torch.float64), abar[:-1]])
    tilde = betas * (1 - abar_prev) / (1 - abar)
    expected_vb = []
    for i in range(b):
        ti = int(t[i])
        x_t = abar[ti].sqrt() * x0[i].double() + (1 - abar[ti]).sqrt() * noise[i].double()
        x0_hat = (x_t - (1 - abar[ti]).sqrt() * eps_hat[i]) / abar[ti].sqrt()  # unclipped in training
        c0 = abar_prev[ti].sqrt() * betas[ti] / (1 - abar[ti])
        ct = (1 - betas[ti]).sqrt() * (1 - abar_prev[ti]) / (1 - abar[ti])
        frac = (v[i] + 1) / 2
        low = math.log(tilde[1]) if ti == 0 else math.log(tilde[ti])
        log_var = frac * math.log(betas[ti]) + (1 - frac) * low
        mean = c0 * x0_hat + ct * x_t
        if ti == 0:
            d = Normal(mean, (0.5 * log_var).exp())
            x = x0[i].double()
            upper = torch.where(x > 0.999, torch.ones_like(x), d.cdf(x + 1 / 255))
            lower = torch.where(x < -0.999, torch.zeros_like(x), d.cdf(x - 1 / 255))
            nats = -(upper - lower).log()
        else:
            true = Normal(c0 * x0[i].double() + ct * x_t, torch.full_like(x_t, math.sqrt(tilde[ti])))
            nats = kl_divergence(true, Normal(mean, (0.5 * log_var).exp()))
        expected_vb.append(nats.mean() / math.log(2))
    vb = torch.stack(expected_vb)
    torch.testing.assert_close(terms["loss_vlb"].double(), vb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(terms["loss_simple"].double(), mse, rtol=1e-5, atol=1e-7)
    # improved-diffusion: loss = mse + vb with vb rescaled by num_timesteps / 1000 (rescale_learned_sigmas)
    torch.testing.assert_close(terms["loss"].double(), mse + vb * T / 1000.0, rtol=1e-4, atol=1e-6)


def test_the_bound_term_trains_only_the_variance(diffusion):
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.rand(4, 1, 4, 4, generator=g) * 2 - 1, torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 3, 20, 40])
    out = (torch.randn(4, 2, 4, 4, generator=g) * 0.3).requires_grad_()
    terms = diffusion.training_losses(fixed_output(out), x0, t, noise)
    (grad_vlb,) = torch.autograd.grad(terms["loss_vlb"].sum(), out, retain_graph=True)
    (grad_simple,) = torch.autograd.grad(terms["loss_simple"].sum(), out)
    assert grad_vlb[:, :1].abs().max() == 0 and grad_vlb[:, 1:].abs().max() > 0  # the mean is detached
    assert grad_simple[:, 1:].abs().max() == 0 and grad_simple[:, :1].abs().max() > 0


@pytest.mark.parametrize("steps", [T, 10])
def test_an_ancestral_step_is_diffusers_learned_range_step(diffusion, steps):
    """One step of diffusers' DDPMScheduler(variance_type="learned_range") on the same model output, x_t and
    noise equals ddpm's, at full T and respaced to 10 steps (the scheduler given the same timesteps)."""
    diffusers = pytest.importorskip("diffusers")
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        trained_betas=diffusion.schedule.betas.double().numpy(),
        variance_type="learned_range",
        clip_sample=True,
        prediction_type="epsilon",
    )
    visited = sampling_timesteps(T, steps, diffusion_spacing())
    scheduler.set_timesteps(timesteps=visited)
    abar = diffusion.schedule.alphas_cumprod.double()
    g = torch.Generator().manual_seed(2)
    for i in [0, len(visited) // 2, len(visited) - 2]:
        t, after = visited[i], visited[i + 1]
        x_t = torch.randn(3, 1, 6, 6, generator=g)
        out = torch.randn(3, 2, 6, 6, generator=g)
        theirs = scheduler.step(out, t, x_t, generator=torch.Generator().manual_seed(9)).prev_sample
        row = ancestral_coefficients(float(abar[t]), float(abar[after]), Variance.learned)
        row += learned_range(float(abar[t]), float(abar[after]))
        denoise = diffusion.denoiser(fixed_output(out), clip_x0=True)
        mine = p_sample(
            denoise,
            x_t,
            torch.full((3,), t),
            torch.tensor(row, dtype=torch.float32),
            torch.Generator().manual_seed(9),
            last=False,
            learned=True,
        )
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


def diffusion_spacing():
    from ddpm.diffusion.sampling import Spacing

    return Spacing.linspace


def test_guidance_guides_the_mean_and_takes_the_conditional_variance():
    """A network whose output is a function of the label alone: the guided objective channels are
    u + s (c - u), the variance channels are the conditional half's."""

    def model(x_t, t, labels):
        base = labels.float().view(-1, 1, 1, 1)
        return torch.cat([base.expand(-1, 1, 2, 2), (10 + base).expand(-1, 1, 2, 2)], dim=1)

    labels, null = torch.tensor([2, 5]), 9
    out = guided_output(model, labels, 3.0, null, learn_sigma=True)(torch.zeros(2, 1, 2, 2), torch.zeros(2))
    assert out.shape == (2, 2, 2, 2)
    torch.testing.assert_close(out[:, 0, 0, 0], 9 + 3.0 * (labels.float() - 9))
    torch.testing.assert_close(out[:, 1, 0, 0], 10 + labels.float())


# ---------------------------------------------------------------------------------------- end to end
LEARNED_RUN = TINY + ["steps=3", "timesteps=20", "sample_every=0", "forward_n=0", "learn_sigma=true"]


@pytest.fixture(scope="module")
def learned_ckpt(tmp_path_factory):
    run = tmp_path_factory.mktemp("learned") / "run"
    train(compose("train", LEARNED_RUN), run)
    return run / "checkpoints" / "last.pt"


def test_a_learned_run_logs_both_terms_of_its_loss(learned_ckpt):
    rows = [json.loads(x) for x in (learned_ckpt.parent.parent / "metrics.jsonl").read_text().splitlines()]
    row = rows[0]
    assert {"loss", "loss_simple", "loss_vlb"} <= set(row)
    assert row["loss"] == pytest.approx(row["loss_simple"] + 0.001 * 20 * row["loss_vlb"], rel=1e-5)


@pytest.mark.parametrize(
    "args",
    [["sample_steps=5"], ["sample_steps=20"], ["ddpm_variance=small"], ["sampler=ddim", "sample_steps=5"]],
)
def test_a_learned_checkpoint_samples_at_any_number_of_steps(in_process, learned_ckpt, tmp_path, args):
    result = in_process(
        "ddpm-sample", f"ckpt={learned_ckpt}", "n=4", "device=cpu", f"out={tmp_path}", *args, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "grid.png").is_file()


def test_the_learned_variance_gives_its_own_samples(learned_ckpt):
    from ddpm.diffusion.generate import generate
    from ddpm.diffusion.sampling import SamplingOptions
    from ddpm.trained import load_trained

    trained = load_trained(learned_ckpt, torch.device("cpu"))
    draw = {
        v: generate(trained, SamplingOptions(sample_steps=5, ddpm_variance=v), 4, 0, 4)
        for v in Variance
        if v is not Variance.large
    }
    assert torch.equal(draw[Variance.auto], draw[Variance.learned])
    assert not torch.equal(draw[Variance.learned], draw[Variance.small])


def test_the_bound_of_a_learned_checkpoint_uses_its_variance(in_process, learned_ckpt, tmp_path):
    out = tmp_path / "out"
    args = [f"ckpt={learned_ckpt}", "nll=true", "features=[]", "nll_n=6", "device=cpu", f"out={out}"]
    assert in_process("ddpm-eval", *args, cwd=tmp_path).returncode == 0
    assert json.loads((out / "eval.json").read_text())["nll"]["variance"] == "learned"


def test_learned_on_a_fixed_variance_checkpoint_is_refused(in_process, tmp_path):
    from conftest import FIXTURES

    result = in_process(
        "ddpm-sample",
        f"ckpt={FIXTURES / 'tiny_v2.pt'}",
        "ddpm_variance=learned",
        f"out={tmp_path / 'o'}",
        cwd=tmp_path,
    )
    assert (
        result.returncode == 2
        and "ddpm_variance=learned needs a model trained with learn_sigma=true" in result.stderr
    )
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["ddpm_variance=learned"], "ddpm_variance=learned needs learn_sigma=true"),
        (["eval.ddpm_variance=learned"], "eval.ddpm_variance=learned needs learn_sigma=true"),
        (["learn_sigma=true", "vlb_weight=-1"], "vlb_weight=-1.0 is invalid"),
        (["learn_sigma=true", "vlb_weight=nan"], "vlb_weight=nan is invalid"),
        (["loss=kl", "min_snr_gamma=5"], "min_snr_gamma=5 weights a distance to the target"),
        (["loss=kl", "ddpm_variance=learned"], "ddpm_variance=learned needs learn_sigma=true"),
    ],
)
def test_bad_learned_variance_settings_are_refused(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        train(compose("train", TINY + overrides), tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("overrides", "variance"),
    [(["ddpm_variance=large"], Variance.large), (["learn_sigma=true"], Variance.learned)],
    ids=["fixed_large", "learned"],
)
def test_a_run_trains_on_the_bound_itself_with_loss_kl(tmp_path, overrides, variance):
    run = tmp_path / "run"
    train(compose("train", [*LEARNED_RUN[:-1], "loss=kl", *overrides]), run)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert not any("loss_vlb" in r for r in rows)  # no hybrid: the bound is the whole loss
    config = load_checkpoint(run / "checkpoints" / "last.pt")["config"]
    assert Diffusion.from_config(OmegaConf.create(config)).bound_variance is variance  # from the file alone


def test_a_resume_that_changes_learn_sigma_is_refused(learned_ckpt):
    run = learned_ckpt.parent.parent
    overrides = ["learn_sigma=false", "resume=auto"]
    # spelled as the command line spells it, not as Python prints a bool
    with pytest.raises(
        ConfigError, match="learn_sigma=false differs from the resumed run's learn_sigma=true"
    ):
        train(compose("train", [*LEARNED_RUN[:-1], *overrides]), run, overrides)
