"""One optimizer step of Algorithm 1, the random draws of each step, and the learning rate of each step.

A step never waits for the device: the learning rate is a device tensor (the LR schedule writes it in
place), and a non-finite step is skipped by fused Adam itself (``found_inf``), not by reading a flag back."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn

from ddpm.diffusion.forward import Loss, Objective, p_losses_per_image
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


def build_optimizer(
    model: nn.Module, lr: float, device: torch.device, capturable: bool = False
) -> torch.optim.Adam:
    """Fused Adam (one kernel for every parameter's update, on the CPU as on a GPU) with the learning rate
    in a device tensor, so that the step that reads it can be captured and replayed (``capturable``)."""
    lr_t = torch.tensor(lr, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr_t, fused=True, capturable=capturable)


def settle_loaded(optimizer: torch.optim.Optimizer, device: torch.device, capturable: bool = False) -> None:
    """After load_state_dict, which sets the saved values: the learning rate back into a device tensor (a
    float in checkpoints of earlier versions), and ``capturable`` as this run needs it."""
    for group in optimizer.param_groups:
        group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(device)
        group["capturable"] = capturable


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


def step_seed(*keys: int) -> int:
    """A seed that is a pure function of ``keys`` (seed, step[, rank]), well mixed (numpy's SeedSequence),
    so that neighbouring steps draw unrelated numbers."""
    words = np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


def sample_noise(
    shape: tuple[int, ...], offset: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """eps ~ N(0, I), plus ``offset`` times one N(0, 1) draw per image and channel (offset noise), which
    lets the model change an image's mean brightness."""
    noise = torch.randn(shape, generator=generator, device=device)
    if offset > 0:
        noise = noise + offset * torch.randn(*shape[:2], 1, 1, generator=generator, device=device)
    return noise


def step_draws(
    seed: int, step: int, shape: tuple[int, ...], timesteps: int, offset: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """t and eps of (1-based) step ``step`` for the whole global batch of ``shape``, from a generator keyed
    on (seed, step): every rank draws the same numbers and keeps its slice, so a step computes the same
    whatever the number of ranks, and a resumed run draws what an uninterrupted one would have."""
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    t = torch.randint(0, timesteps, (shape[0],), generator=generator, device=device)
    return t, sample_noise(shape, offset, generator, device)


QUARTILES = 4  # the loss is also reported by timestep quartile, as improved-diffusion's loss_q0..q3


@dataclass
class BatchLoss:
    """A batch's loss, as device tensors (read back only at the logging cadence)."""

    loss: torch.Tensor  # the batch's mean loss
    quartile_loss: torch.Tensor  # (4,) summed loss of the images whose t fell in each quarter of [0, T)
    quartile_count: torch.Tensor  # (4,) how many images that was


@dataclass
class StepResult(BatchLoss):
    """What a step reports: its loss, and what became of the gradient."""

    finite: torch.Tensor  # whether the loss and the gradient were finite
    grad_norm: torch.Tensor  # the gradient's global norm, before clipping


def accumulate_gradients(
    model: nn.Module,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    opts: StepOptions,
    no_sync: Callable[[], AbstractContextManager] | None = None,
) -> BatchLoss:
    """The gradient of the batch's mean loss, into the parameters' .grad, in ``grad_accum`` micro-batches.
    t and eps come for the whole batch, so grad_accum changes memory use, not the result. ``no_sync``
    (DistributedDataParallel's) holds the gradients' all-reduce back until the last micro-batch."""
    device = x0.device
    total = torch.zeros((), device=device)
    quartile_loss = torch.zeros(QUARTILES, device=device)
    quartile_count = torch.zeros(QUARTILES, device=device)
    parts = list(
        zip(x0.chunk(opts.grad_accum), t.chunk(opts.grad_accum), noise.chunk(opts.grad_accum), strict=True)
    )
    for i, (x, tt, eps) in enumerate(parts):
        last = i + 1 == len(parts)
        with contextlib.nullcontext() if last or no_sync is None else no_sync():
            per_image = p_losses_per_image(
                model, schedule, x, tt, eps, opts.loss, opts.objective, opts.min_snr_gamma
            )
            loss = per_image.mean()
            (loss / opts.grad_accum).backward()
        total += loss.detach() / opts.grad_accum
        quartile = tt * QUARTILES // schedule.timesteps
        quartile_loss.index_add_(0, quartile, per_image.detach())
        quartile_count.index_add_(0, quartile, torch.ones_like(per_image))
    return BatchLoss(total, quartile_loss, quartile_count)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    x0: torch.Tensor,
    t: torch.Tensor,
    noise: torch.Tensor,
    opts: StepOptions,
    agree: Callable[[torch.Tensor], torch.Tensor] = lambda finite: finite,
) -> StepResult:
    """One optimizer step over the batch x0 with the step's t and eps; ``optimizer`` is fused Adam
    (build_optimizer). Nothing here waits for the device: reading the result's tensors does, so the caller
    does that only at its cadence. With ``skip_nonfinite``, a non-finite step changes nothing: fused Adam
    leaves the weights, its moments and its step count as they were where ``found_inf`` is set, from the
    finite flag that ``agree`` has made the same on every rank."""
    optimizer.zero_grad(set_to_none=True)
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel's
    batch = accumulate_gradients(model, schedule, x0, t, noise, opts, no_sync)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if opts.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(batch.loss) & torch.isfinite(norm)
    if opts.skip_nonfinite:
        finite = agree(finite)
        optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined] (read by fused Adam)
    optimizer.step()
    return StepResult(batch.loss, batch.quartile_loss, batch.quartile_count, finite, norm)
