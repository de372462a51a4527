"""Beta schedules (the ``schedule`` config group) and the quantities of the forward process derived from
them, computed once.

Index ``t`` runs over 0 ... T-1 (the paper's 1 ... T): ``alphas_cumprod[t]`` is abar_{t+1}.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Protocol

import torch
from omegaconf import MISSING

from ddpm import checks
from ddpm.errors import ConfigError
from ddpm.registry import Option, Registry


# ---------------------------------------------------------------------------------------------- schemas
@dataclass
class ScheduleConfig:
    name: str = MISSING
    zero_terminal_snr: bool = MISSING  # rescale so abar_T = 0 exactly (Lin et al. 2024, Algorithm 1)


@dataclass
class LinearSchedule(ScheduleConfig):
    beta_start: float = MISSING
    beta_end: float = MISSING


@dataclass
class QuadraticSchedule(LinearSchedule):
    pass


@dataclass
class SigmoidSchedule(LinearSchedule):
    start: float = MISSING  # the sigmoid is evaluated on linspace(start, end, T)
    end: float = MISSING


@dataclass
class GivenSchedule(ScheduleConfig):
    betas: list[float] = MISSING  # beta_1 ... beta_T themselves (diffusers' trained_betas)


@dataclass
class CosineSchedule(ScheduleConfig):
    s: float = MISSING  # offset that keeps beta_1 from being vanishingly small (Nichol & Dhariwal)
    max_beta: float = MISSING  # clip near t = T, where the cosine formula sends beta to 1


# ------------------------------------------------------------------------------------------------ betas


def linear_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)


def quadratic_betas(timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    return torch.linspace(beta_start**0.5, beta_end**0.5, timesteps, dtype=torch.float64) ** 2


def sigmoid_betas(
    timesteps: int, beta_start: float, beta_end: float, start: float, end: float
) -> torch.Tensor:
    x = torch.linspace(start, end, timesteps, dtype=torch.float64)
    return torch.sigmoid(x) * (beta_end - beta_start) + beta_start


def cosine_betas(timesteps: int, s: float, max_beta: float) -> torch.Tensor:
    """Nichol & Dhariwal 2021, eq. 17: abar(t) = f(t) / f(0), f(t) = cos^2(((t/T + s) / (1 + s)) pi/2)."""
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    alphas_cumprod = f / f[0]
    betas = 1 - alphas_cumprod[1:] / alphas_cumprod[:-1]
    return betas.clamp(max=max_beta)


def given_betas(betas: Any) -> torch.Tensor:
    return torch.tensor(list(betas), dtype=torch.float64)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_1) is kept and
    sqrt(abar_T) = 0, i.e. x_T is pure noise and training sees the very distribution sampling starts from."""
    sqrt_abar = torch.cumprod(1 - betas.to(torch.float64), 0).sqrt()
    first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - last) * first / (first - last)
    abar = sqrt_abar**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


# ----------------------------------------------------------------------------------------------- checks
def check_beta_range(cfg: Any) -> None:
    if not 0 < cfg.beta_start <= cfg.beta_end < 1:
        raise ConfigError(
            f"schedule.beta_start={cfg.beta_start}, schedule.beta_end={cfg.beta_end} are invalid: "
            "they need 0 < beta_start <= beta_end < 1"
        )


def check_sigmoid(cfg: Any) -> None:
    check_beta_range(cfg)
    checks.finite("schedule.start", cfg.start)
    checks.finite("schedule.end", cfg.end)
    if not cfg.start < cfg.end:
        raise ConfigError(f"schedule.start={cfg.start} must be below schedule.end={cfg.end}")


def check_cosine(cfg: Any) -> None:
    if not 0 < cfg.max_beta < 1:
        raise ConfigError(f"schedule.max_beta={cfg.max_beta} is invalid: it must lie in (0, 1)")
    checks.at_least("schedule.s", cfg.s, 0)


def check_given(cfg: Any) -> None:
    # beta_T = 1 is a zero-terminal-SNR schedule's last step; every other beta must keep some signal
    bad = [b for b in cfg.betas[:-1] if not 0 < b < 1] + [b for b in cfg.betas[-1:] if not 0 < b <= 1]
    if not cfg.betas or bad:
        first = f": {bad[0]} is not" if bad else ""
        raise ConfigError(
            f"schedule.betas is invalid{first}: give one beta per step, in (0, 1), the last in (0, 1]"
        )


class BuildBetas(Protocol):
    """A schedule option's builder: its config entry and T -> the T betas (float64)."""

    def __call__(self, cfg: Any, timesteps: int) -> torch.Tensor: ...


class CheckSchedule(Protocol):
    """A schedule option's own checks of its config entry."""

    def __call__(self, cfg: Any) -> None: ...


SCHEDULES: Registry[BuildBetas, CheckSchedule] = Registry(
    "schedule",
    Option(
        "linear", LinearSchedule, lambda c, T: linear_betas(T, c.beta_start, c.beta_end), check_beta_range
    ),
    Option(
        "quadratic",
        QuadraticSchedule,
        lambda c, T: quadratic_betas(T, c.beta_start, c.beta_end),
        check_beta_range,
    ),
    Option(
        "sigmoid",
        SigmoidSchedule,
        lambda c, T: sigmoid_betas(T, c.beta_start, c.beta_end, c.start, c.end),
        check_sigmoid,
    ),
    Option("cosine", CosineSchedule, lambda c, T: cosine_betas(T, c.s, c.max_beta), check_cosine),
    Option("given", GivenSchedule, lambda c, T: given_betas(c.betas), check_given),
)


def check_schedule(cfg: Any, timesteps: int) -> None:
    checks.at_least("timesteps", timesteps, 1)
    SCHEDULES[cfg.name].check(cfg)
    if cfg.name == "given" and len(cfg.betas) != timesteps:
        raise ConfigError(
            f"schedule.betas has {len(cfg.betas)} betas for timesteps={timesteps}: give one per step"
        )


def make_betas(cfg: Any, timesteps: int) -> torch.Tensor:
    """Betas for the schedule config ``cfg`` (a ``schedule`` group entry)."""
    betas = SCHEDULES[cfg.name].build(cfg, timesteps)
    return rescale_zero_terminal_snr(betas) if cfg.zero_terminal_snr else betas


# ---------------------------------------------------------------------------------- the forward process


@dataclass(frozen=True)
class Schedule:
    """The forward process q(x_t | x_0) and the posterior q(x_{t-1} | x_t, x_0), as float32 buffers."""

    betas: torch.Tensor
    alphas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    sqrt_alphas_cumprod: torch.Tensor
    sqrt_one_minus_alphas_cumprod: torch.Tensor
    sqrt_recip_alphas: torch.Tensor
    posterior_variance: torch.Tensor
    posterior_mean_coef_x0: torch.Tensor  # eq. 7's mean = coef_x0 x_0 + coef_xt x_t
    posterior_mean_coef_xt: torch.Tensor
    # The fixed variances of p(x_{t-1} | x_t) for the likelihood, whose t = 0 term needs a variance > 0:
    # log beta~_t with beta~_1 at t = 0 (beta~_0 = 0), and beta_t with beta~_1 at t = 0 (Ho et al.'s
    # "large" choice), and its log.
    posterior_log_variance_clipped: torch.Tensor
    log_betas: torch.Tensor  # the top of a learned variance's range (Nichol & Dhariwal eq. 15)
    large_variance: torch.Tensor
    large_log_variance: torch.Tensor

    @classmethod
    def from_betas(cls, betas: torch.Tensor) -> Schedule:
        # Derived in float64, stored in float32: cumulative products of ~1,000 factors lose digits in fp32.
        betas = betas.to(torch.float64)
        alphas = 1.0 - betas
        alphas_cumprod = torch.cumprod(alphas, dim=0)
        alphas_cumprod_prev = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
        posterior_variance = betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
        # beta~_1 stands in for beta~_0 = 0; a one-step chain has no beta~_1, and takes beta_0
        first = posterior_variance[1:2] if betas.shape[0] > 1 else betas[:1]
        large_variance = torch.cat([first, betas[1:]])
        buffers = dict(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=alphas_cumprod,
            alphas_cumprod_prev=alphas_cumprod_prev,
            sqrt_alphas_cumprod=alphas_cumprod.sqrt(),
            sqrt_one_minus_alphas_cumprod=(1.0 - alphas_cumprod).sqrt(),
            sqrt_recip_alphas=alphas.rsqrt(),
            # beta~_t of eq. 7: the variance of q(x_{t-1} | x_t, x_0)
            posterior_variance=posterior_variance,
            posterior_mean_coef_x0=alphas_cumprod_prev.sqrt() * betas / (1.0 - alphas_cumprod),
            posterior_mean_coef_xt=alphas.sqrt() * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            posterior_log_variance_clipped=torch.cat([first, posterior_variance[1:]]).log(),
            log_betas=betas.log(),
            large_variance=large_variance,
            large_log_variance=large_variance.log(),
        )
        return cls(**{k: v.to(torch.float32) for k, v in buffers.items()})

    @property
    def timesteps(self) -> int:
        return self.betas.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def build_schedule(cfg: Any, timesteps: int) -> Schedule:
    return Schedule.from_betas(make_betas(cfg, timesteps))


def extract(buffer: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """buffer[t] shaped (B, 1, 1, ...) to broadcast against a batch of ``ndim``-dimensional images."""
    return buffer.gather(0, t).reshape(t.shape[0], *([1] * (ndim - 1)))
