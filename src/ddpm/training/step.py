"""One optimizer step of Algorithm 1, and the learning rate of each step."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn

from ddpm.diffusion.forward import Loss, Objective, p_losses
from ddpm.diffusion.schedules import Schedule
from ddpm.training.stopping import OnNonFinite


class LRDecay(Enum):
    none = "none"
    cosine = "cosine"  # after the warm-up, down to 0 when training ends


def lr_factor(step: int, warmup: int, decay: LRDecay, total: int) -> float:
    """The learning rate of 0-based step ``step`` as a fraction of ``lr``: linear warm-up over ``warmup``
    steps, then constant or a cosine that reaches 0 when training ends (step == total)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay is LRDecay.cosine:
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


@dataclass(frozen=True)
class StepOptions:
    """The parts of the config that one training step reads."""

    loss: Loss
    objective: Objective
    min_snr_gamma: float
    offset_noise: float
    grad_accum: int
    grad_clip: float
    skip_nonfinite: bool

    @classmethod
    def from_config(cls, cfg: Any) -> StepOptions:
        skip = cfg.on_nonfinite is OnNonFinite.skip
        return cls(
            cfg.loss, cfg.objective, cfg.min_snr_gamma, cfg.offset_noise, cfg.grad_accum, cfg.grad_clip, skip
        )


def sample_noise(x0: torch.Tensor, offset: float) -> torch.Tensor:
    """eps ~ N(0, I), plus ``offset`` times one N(0, 1) draw per image and channel (offset noise), which
    lets the model change an image's mean brightness."""
    noise = torch.randn_like(x0)
    if offset > 0:
        noise = noise + offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device, dtype=x0.dtype)
    return noise


def accumulate_gradients(
    model: nn.Module, schedule: Schedule, x0: torch.Tensor, opts: StepOptions
) -> torch.Tensor:
    """The gradient of the batch's mean loss, into the parameters' .grad, in ``grad_accum`` micro-batches;
    returns the loss. t and eps are drawn for the whole batch first, so grad_accum changes memory use,
    not the result."""
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
    noise = sample_noise(x0, opts.offset_noise)
    total = torch.zeros((), device=x0.device)
    for x, tt, eps in zip(
        x0.chunk(opts.grad_accum), t.chunk(opts.grad_accum), noise.chunk(opts.grad_accum), strict=True
    ):
        loss = p_losses(model, schedule, x, tt, eps, opts.loss, opts.objective, opts.min_snr_gamma)
        (loss / opts.grad_accum).backward()
        total += loss.detach() / opts.grad_accum
    return total


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    x0: torch.Tensor,
    opts: StepOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step over the batch x0. Returns the loss and whether it and the gradient are finite,
    as device tensors: reading them forces a host synchronisation, so the caller does that only at its
    logging cadence. With ``skip_nonfinite`` a non-finite step changes nothing, which needs that read
    here, on every step."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, schedule, x0, opts)
    params = [p for p in model.parameters() if p.grad is not None]
    if opts.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(loss) & torch.isfinite(norm)
    if opts.skip_nonfinite and not bool(finite):
        return loss, finite
    optimizer.step()
    return loss, finite
