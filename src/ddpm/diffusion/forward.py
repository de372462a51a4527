"""The forward process and the training objective (Ho et al. 2020, eq. 4 and Algorithm 1), with the
prediction targets and loss weightings that followed it."""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.diffusion.schedules import Schedule, extract


class Loss(Enum):
    """The distance between the network's output and its target."""

    l1 = "l1"
    l2 = "l2"
    huber = "huber"  # smooth l1: quadratic below 1, linear above


class Objective(Enum):
    """What the network predicts: the noise (Ho et al.), the clean image, or v (Salimans & Ho 2022)."""

    eps = "eps"
    x0 = "x0"
    v = "v"


# (x_t, t) -> (x0_hat, eps_hat): a model's output read through its objective.
Denoiser = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) in closed form."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def target(objective: Objective, schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor):
    """What the network is trained to output: eps, x_0, or v = sqrt(abar) eps - sqrt(1 - abar) x_0
    (Salimans & Ho 2022)."""
    if objective is Objective.eps:
        return noise
    if objective is Objective.x0:
        return x0
    a = extract(schedule.sqrt_alphas_cumprod, t, x0.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim)
    return a * noise - s * x0


def predict_x0_eps(
    objective: Objective, schedule: Schedule, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Invert x_t = a x_0 + s eps for the pair (x_0, eps), given the network's output ``out``."""
    a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
    s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
    if objective is Objective.eps:
        return (x_t - s * out) / a, out
    if objective is Objective.x0:
        return out, (x_t - a * out) / s
    return a * x_t - s * out, s * x_t + a * out  # v: a^2 + s^2 = 1


def make_denoiser(model: nn.Module, schedule: Schedule, objective: Objective, clip_x0: bool) -> Denoiser:
    """The model as a function (x_t, t) -> (x0_hat, eps_hat). With ``clip_x0``, x0_hat is clipped to the
    data range [-1, 1] and eps_hat recomputed from it, so both stay consistent with x_t."""

    def denoise(x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x0, eps = predict_x0_eps(objective, schedule, x_t, t, model(x_t, t))
        if clip_x0:
            x0 = x0.clamp(-1.0, 1.0)
            a = extract(schedule.sqrt_alphas_cumprod, t, x_t.ndim)
            s = extract(schedule.sqrt_one_minus_alphas_cumprod, t, x_t.ndim)
            eps = (x_t - a * x0) / s  # s = sqrt(1 - abar_t) > 0 at every t
        return x0, eps

    return denoise


def snr_weight(objective: Objective, schedule: Schedule, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023), expressed for each objective's own loss:
    min(SNR, gamma) / SNR for eps, min(SNR, gamma) for x_0, min(SNR, gamma) / (SNR + 1) for v."""
    abar = schedule.alphas_cumprod[t]
    snr = abar / (1 - abar)
    clipped = snr.clamp(max=gamma)
    if objective is Objective.eps:
        return clipped / snr
    if objective is Objective.x0:
        return clipped
    return clipped / (snr + 1)


def elementwise_loss(loss: Loss, prediction: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    if loss is Loss.l1:
        return F.l1_loss(prediction, truth, reduction="none")
    if loss is Loss.l2:
        return F.mse_loss(prediction, truth, reduction="none")
    if loss is Loss.huber:
        return F.smooth_l1_loss(prediction, truth, reduction="none")
    raise ValueError(f"unknown loss {loss!r}")


def p_losses_per_image(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    loss: Loss,
    objective: Objective = Objective.eps,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """Algorithm 1's objective for each image: noise x_0 to x_t, ask the model for its target, compare with
    the truth, mean over the pixels; with ``min_snr_gamma > 0`` weighted by the image's SNR."""
    x_t = q_sample(schedule, x0, t, noise)
    per_pixel = elementwise_loss(loss, model(x_t, t), target(objective, schedule, x0, t, noise))
    per_image = per_pixel.flatten(1).mean(dim=1)
    if min_snr_gamma > 0:
        per_image = per_image * snr_weight(objective, schedule, t, min_snr_gamma)
    return per_image


def p_losses(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    loss: Loss,
    objective: Objective = Objective.eps,
    min_snr_gamma: float = 0.0,
) -> torch.Tensor:
    """The batch's mean of p_losses_per_image."""
    return p_losses_per_image(model, schedule, x0, t, noise, loss, objective, min_snr_gamma).mean()
