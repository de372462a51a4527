"""Samplers. Each is a pure function

    sampler(denoise, schedule, x_T, timesteps, generator, **options) -> x_0 in [-1, 1]

of a denoiser (x_t, t) -> (x0_hat, eps_hat), the schedule, the starting noise, the timesteps to visit
(descending, 0-based, from ``sampling_timesteps``) and a generator for any fresh noise. The model is called
once per visited timestep. Coefficients are computed once per call in float64 on the host and moved to the
device as a table, beside a table of the timesteps; each step slices its row (a view), so the loops neither
wait for the device nor build tensors from Python values, and a step's kernels read every coefficient
from device memory. An optional ``on_step(i, x)`` sees the state after each of the
``len(timesteps)`` steps (i = 1 ... len(timesteps); the last is the returned images before they are
clipped to [-1, 1]); it only reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from fractions import Fraction
from typing import Any

import torch

from ddpm import checks
from ddpm.diffusion.gaussian import Denoiser, Variance
from ddpm.diffusion.schedules import Schedule
from ddpm.errors import ConfigError


class Spacing(Enum):
    """Which of the T training timesteps a shorter sampling run visits."""

    linspace = "linspace"
    leading = "leading"
    trailing = "trailing"


def sampling_timesteps(timesteps: int, steps: int, spacing: Spacing) -> list[int]:
    """``steps`` distinct timesteps of [0, T-1], descending. ``linspace`` spreads them evenly over
    [0, T-1]; ``leading`` takes 0, k, 2k, ... (k = T // steps); ``trailing`` takes round(T - i T / steps)
    - 1 for i = 0 ... steps - 1, which always starts from the noisiest step (Lin et al. 2024, table 2).
    Trailing is computed in exact fractions: a float range from T down to 0 overshoots by one step for
    some n (T=200: n=29, 31, ...) and then ends in -1."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"cannot visit {steps} of {timesteps} timesteps")
    if spacing is Spacing.linspace:
        ts = torch.linspace(0, timesteps - 1, steps, dtype=torch.float64).round().long().tolist()
    elif spacing is Spacing.leading:
        ts = [i * (timesteps // steps) for i in range(steps)]
    else:
        # round() of a Fraction rounds half to even, as the float version did where it was right
        ts = [round(Fraction(timesteps * (steps - i), steps)) - 1 for i in range(steps)]
    return sorted(set(ts), reverse=True)


def _alphas_cumprod(schedule: Schedule, timesteps: list[int]) -> tuple[list[float], list[float]]:
    """abar at each visited step and at the step after it (1.0 after the last: x_0 itself)."""
    abar = schedule.alphas_cumprod.detach().double().cpu()[timesteps].tolist()
    return abar, abar[1:] + [1.0]


def _table(rows: list[tuple[float, ...]], like: torch.Tensor) -> torch.Tensor:
    """Per-step coefficients (one row per visited step), computed in float64 on the host and moved to
    ``like``'s device and dtype once per call: the loop then slices a row per step, a view, where reading
    a coefficient from the device would wait for it."""
    return torch.tensor(rows, dtype=torch.float64).to(device=like.device, dtype=like.dtype)


def _t_table(timesteps: list[int], x: torch.Tensor) -> torch.Tensor:
    """(steps, batch): row i is the timestep the model sees at step i, for every image, built once."""
    t = torch.tensor(timesteps, dtype=torch.long).view(-1, 1).expand(-1, x.shape[0])
    return t.contiguous().to(x.device)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# on_step(i, x): the state x after step i of a sampler's run (i = 1 ... number of visited timesteps)
OnStep = Callable[[int, torch.Tensor], None]


def ancestral_coefficients(abar: float, abar_prev: float, variance: Variance) -> tuple[float, float, float]:
    """(c_x0, c_xt, sigma) of one ancestral step from t to the next visited step t':
    x_t' = c_x0 x0_hat + c_xt x_t + sigma z.

    With beta' = 1 - abar_t / abar_t' (the respaced process of Nichol & Dhariwal 2021, sec. 4; beta_t when
    every step is visited), c_x0 x0_hat + c_xt x_t is eq. 7's posterior mean and sigma^2 = beta~ =
    (1 - abar_t') / (1 - abar_t) beta' (``small``) or beta' (``large``)."""
    beta = 1 - abar / abar_prev
    c_x0 = math.sqrt(abar_prev) * beta / (1 - abar)
    c_xt = math.sqrt(1 - beta) * (1 - abar_prev) / (1 - abar)
    # (a learned variance's sigma is the network's: see learned_range; this column then goes unread)
    var = beta * (1 - abar_prev) / (1 - abar) if variance is Variance.small else beta
    return c_x0, c_xt, math.sqrt(var)


def learned_range(abar: float, abar_prev: float) -> tuple[float, float]:
    """(log beta', log beta~') of one respaced step from t to t': the two ends between which a learned
    variance's frac interpolates (improved-diffusion's respace.py, diffusers PR #3006). The last step's
    beta~' is 0 and its noise is never drawn; it takes beta' so that the row stays finite."""
    beta = 1 - abar / abar_prev
    tilde = beta * (1 - abar_prev) / (1 - abar)
    return math.log(beta), math.log(tilde) if tilde > 0 else math.log(beta)


def p_sample(
    denoise: Denoiser,
    x_t: torch.Tensor,
    t: torch.Tensor,
    coefficients: torch.Tensor,
    generator: torch.Generator | None,
    last: bool,
    learned: bool = False,
) -> torch.Tensor:
    """One ancestral step: x_t' ~ q(x_t' | x_t, x0_hat), with ``coefficients`` the (c_x0, c_xt, sigma) of
    ``ancestral_coefficients`` on x_t's device and ``t`` the batch's timestep; with ``learned`` followed by
    ``learned_range``'s two logs, between which the network's frac sets each pixel's variance. The last
    step adds no noise."""
    pred = denoise(x_t, t)
    mean = coefficients[0] * pred.x0 + coefficients[1] * x_t
    if last:
        return mean
    if learned:
        assert pred.frac is not None
        log_var = pred.frac * coefficients[3] + (1 - pred.frac) * coefficients[4]
        return mean + torch.exp(0.5 * log_var) * _noise(x_t, generator)
    return mean + coefficients[2] * _noise(x_t, generator)


@torch.no_grad()
def p_sample_loop(
    denoise: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    generator: torch.Generator | None = None,
    variance: Variance | str = Variance.small,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """Ancestral sampling, Algorithm 2 of Ho et al. 2020, over the visited timesteps. With every step
    visited and eps-prediction it is Algorithm 2 line for line: x_{t-1} = 1/sqrt(alpha_t) (x_t - beta_t /
    sqrt(1 - abar_t) eps) + sigma_t z is eq. 7's posterior mean written in eps. ``variance`` is small,
    large or learned (Diffusion.resolve_variance turns auto into one of them for a model)."""
    variance = Variance(variance)  # a name, or the enum itself
    if variance is Variance.auto:
        raise ValueError(
            "ddpm_variance=auto names no variance until Diffusion.resolve_variance reads the model"
        )
    learned = variance is Variance.learned
    abar, abar_prev = _alphas_cumprod(schedule, timesteps)
    rows = [
        ancestral_coefficients(a, p, variance) + (learned_range(a, p) if learned else ())
        for a, p in zip(abar, abar_prev, strict=True)
    ]
    coefficients = _table(rows, x_T)
    ts = _t_table(timesteps, x_T)
    x = x_T
    for i in range(len(timesteps)):
        x = p_sample(denoise, x, ts[i], coefficients[i], generator, i + 1 == len(timesteps), learned)
        if on_step is not None:
            on_step(i + 1, x)
    return x.clamp(-1.0, 1.0)


@torch.no_grad()
def ddim_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    generator: torch.Generator | None = None,
    eta: float = 0.0,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """DDIM, Song et al. 2021, eq. 12: x_t' = sqrt(abar_t') x0_hat + sqrt(1 - abar_t' - sigma^2) eps_hat
    + sigma z, with sigma = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t').
    eta = 0 is deterministic; eta = 1 has the variance of DDPM's fixed-small sampler."""
    rows = []
    for a, p in zip(*_alphas_cumprod(schedule, timesteps), strict=True):
        sigma = eta * math.sqrt((1 - p) / (1 - a) * (1 - a / p))
        rows.append((math.sqrt(p), math.sqrt(max(1 - p - sigma**2, 0.0)), sigma))
    coefficients, ts = _table(rows, x_T), _t_table(timesteps, x_T)
    x = x_T
    for i, (_, _, sigma) in enumerate(rows):
        c = coefficients[i]
        x0, eps, _ = denoise(x, ts[i])
        x = c[0] * x0 + c[1] * eps
        if sigma > 0:  # decided on the host: no noise is drawn for a deterministic step
            x = x + c[2] * _noise(x, generator)
        if on_step is not None:
            on_step(i + 1, x)
    return x.clamp(-1.0, 1.0)


def _dpm_solver_rows(schedule: Schedule, timesteps: list[int]) -> tuple[list[tuple[float, ...]], list[bool]]:
    """Per step of DPM-Solver++(2M) but the last: (sigma_i+1 / sigma_i, alpha_i+1 expm1(-h_i), w, w_prev)
    with D_i = w x0_hat_i - w_prev x0_hat_i-1, and whether the step is second order (a first-order step
    takes D_i = x0_hat_i: the first one, and the one after an infinite h)."""
    abar = schedule.alphas_cumprod.detach().double().cpu()[timesteps]
    alpha, sigma = abar.sqrt(), (1 - abar).sqrt()
    lam = (alpha.log() - sigma.log()).tolist()  # -inf where abar = 0 (zero terminal SNR) is fine below
    alpha, sigma = alpha.tolist(), sigma.tolist()
    rows, second = [], []
    h_prev = None
    for i in range(len(timesteps) - 1):
        h = lam[i + 1] - lam[i]
        second.append(h_prev is not None and not math.isinf(h_prev))
        r = h_prev / h if second[-1] else 1.0
        rows.append((sigma[i + 1] / sigma[i], alpha[i + 1] * math.expm1(-h), 1 + 1 / (2 * r), 1 / (2 * r)))
        h_prev = h
    return rows, second


@torch.no_grad()
def dpm_solver_pp_sample(
    denoise: Denoiser,
    schedule: Schedule,
    x_T: torch.Tensor,
    timesteps: list[int],
    generator: torch.Generator | None = None,
    on_step: OnStep | None = None,
) -> torch.Tensor:
    """DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: a second-order multistep solver of the diffusion ODE
    in the data prediction x0_hat, with lambda = log(alpha / sigma):
        D_i = (1 + 1/(2 r_i)) x0_hat_{i-1} - 1/(2 r_i) x0_hat_{i-2},  r_i = h_{i-1} / h_i
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D_i
    The first step is first order; the last one lands on x0_hat (sigma = 0). Deterministic."""
    if not timesteps:
        raise ValueError("no timesteps to visit")
    rows, second = _dpm_solver_rows(schedule, timesteps)
    coefficients, ts = _table(rows, x_T), _t_table(timesteps, x_T)
    x, x0_prev = x_T, x_T
    for i in range(len(rows)):
        c = coefficients[i]
        x0 = denoise(x, ts[i]).x0
        d = c[2] * x0 - c[3] * x0_prev if second[i] else x0
        x = c[0] * x - c[1] * d
        x0_prev = x0
        if on_step is not None:
            on_step(i + 1, x)
    x0 = denoise(x, ts[-1]).x0
    if on_step is not None:
        on_step(len(timesteps), x0)
    return x0.clamp(-1.0, 1.0)


# ------------------------------------------------------------------------------------ choosing a sampler
@dataclass(frozen=True)
class SamplingOptions:
    """How images are drawn: the sampling keys of ddpm-train, ddpm-sample and ddpm-eval."""

    sampler: str = "ddpm"
    sample_steps: int | None = 100  # at most T (more means all T); None: all T
    timestep_spacing: Spacing = Spacing.linspace
    eta: float = 0.0  # ddim only
    ddpm_variance: Variance = Variance.auto  # ddpm only; auto: the model's own (resolve_variance)
    clip_x0: bool | None = None  # None: the model's own (TrainedModel.default_clip)
    guidance_scale: float | None = None  # conditional models; None: the model's default

    @classmethod
    def from_config(cls, cfg: Any) -> SamplingOptions:
        return cls(
            cfg.sampler,
            cfg.sample_steps,
            cfg.timestep_spacing,
            cfg.eta,
            cfg.ddpm_variance,
            cfg.clip_x0,
            cfg.get("guidance_scale"),
        )

    def steps(self, timesteps: int) -> int:
        """The steps a model of T=``timesteps`` is sampled with: sample_steps, at most T (a cheap default
        that a short schedule does not reach visits all of it); None: all T."""
        return timesteps if self.sample_steps is None else min(self.sample_steps, timesteps)


@dataclass(frozen=True)
class Sampler:
    """A sampler and the keyword options it takes from SamplingOptions (the others' are not its business)."""

    run: Callable[..., torch.Tensor]
    options: Callable[[SamplingOptions], dict[str, Any]] = lambda s: {}


SAMPLERS: dict[str, Sampler] = {
    "ddpm": Sampler(p_sample_loop, lambda s: {"variance": s.ddpm_variance}),
    "ddim": Sampler(ddim_sample, lambda s: {"eta": s.eta}),
    "dpm_solver++": Sampler(dpm_solver_pp_sample),
}


def check_sampling(cfg: Any, prefix: str = "") -> None:
    """The sampling keys (named ``prefix`` + key). sample_steps needs no T: more than T means all T."""
    checks.one_of(f"{prefix}sampler", cfg.sampler, SAMPLERS)
    if cfg.sample_steps is not None and not cfg.sample_steps >= 1:
        raise ConfigError(
            f"{prefix}sample_steps={cfg.sample_steps} is invalid: it must be >= 1 (at most T are visited; "
            "null: all T)"
        )
    checks.at_least(f"{prefix}eta", cfg.eta, 0)
    if cfg.guidance_scale is not None:
        checks.at_least(f"{prefix}guidance_scale", cfg.guidance_scale, 0)
