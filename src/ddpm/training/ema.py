"""Exponential moving average of the weights, the copy that samples are drawn from.

torch.optim.swa_utils.AveragedModel keeps its update count in a device tensor; a warm-up decay computed
from it would read that tensor back on every step. Here the step count stays on the host: ``at(step)``
writes the step's weight into a device tensor (no synchronisation), and ``apply`` reads it there with
fused multi-tensor kernels, so a captured CUDA graph replays it at every step. ``torch._foreach_lerp_``
has no overload for a tensor weight: given one it reads the weight back as a Python number, a sync on
every step that stream capture refuses.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


def ema_decay(decay: float, warmup: float, step: int) -> float:
    """The decay at optimizer step ``step`` (1-based): min(decay, (1 + step) / (warmup + step)).

    The warm-up lets the average forget the random initial weights quickly (the TensorFlow
    ExponentialMovingAverage's num_updates rule for warmup = 10); warmup = 0 uses ``decay`` from the start."""
    if warmup <= 0:
        return decay
    return min(decay, (1 + step) / (warmup + step))


class EMA:
    """An averaged copy of ``model``: after each optimizer step, ema <- decay_t ema + (1 - decay_t) model."""

    def __init__(self, model: nn.Module, decay: float, warmup: float) -> None:
        self.decay, self.warmup = decay, warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._ema = list(self.model.parameters())
        self._live = list(model.parameters())
        self.weight = torch.zeros((), device=self._ema[0].device)  # 1 - decay of the coming update

    def at(self, step: int) -> None:
        """Set the weight of optimizer step ``step``'s update (1-based)."""
        self.weight.fill_(1.0 - ema_decay(self.decay, self.warmup, step))

    @torch.no_grad()
    def apply(self) -> None:
        # ema + w (live - ema): _foreach_mul_ takes the weight as a device tensor
        step = torch._foreach_sub(self._live, self._ema)
        torch._foreach_mul_(step, self.weight)
        torch._foreach_add_(self._ema, step)

    def update(self, step: int) -> None:
        self.at(step)
        self.apply()

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()
