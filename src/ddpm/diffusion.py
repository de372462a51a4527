"""The forward process and the training objective (Ho et al. 2020, eq. 4 and Algorithm 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ddpm.config import Loss
from ddpm.schedules import Schedule, extract


def q_sample(schedule: Schedule, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: a sample of q(x_t | x_0) in closed form."""
    return (
        extract(schedule.sqrt_alphas_cumprod, t, x0.ndim) * x0
        + extract(schedule.sqrt_one_minus_alphas_cumprod, t, x0.ndim) * noise
    )


def noise_loss(loss: Loss, target: torch.Tensor, prediction: torch.Tensor) -> torch.Tensor:
    """Mean distance between the true and the predicted noise."""
    if loss is Loss.l1:
        return F.l1_loss(prediction, target)
    if loss is Loss.l2:
        return F.mse_loss(prediction, target)
    if loss is Loss.huber:
        return F.smooth_l1_loss(prediction, target)
    raise ValueError(f"unknown loss {loss!r}")


def p_losses(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    loss: Loss,
) -> torch.Tensor:
    """Algorithm 1's objective: noise x_0 to x_t, ask the model for the noise, compare with the truth."""
    x_t = q_sample(schedule, x0, t, noise)
    return noise_loss(loss, noise, model(x_t, t))
