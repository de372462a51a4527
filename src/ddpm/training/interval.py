"""What one step of the loop ends with (``Due``), and what a log line reports since the previous one
(``Interval``): the loop's bookkeeping, kept out of the loop so that it reads as the phases of a step."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ddpm.runtime import Runtime
from ddpm.training.step import QUARTILES, StepResult


class Interval:
    """What the log line and the metrics row report since the previous one: the mean loss of the finite
    steps, the mean gradient norm, the loss by timestep quartile, and the training throughput; the time
    spent drawing grids and writing checkpoints is left out of the throughput."""

    def __init__(self, device: torch.device) -> None:
        # loss, finite steps, gradient norm, then the quartiles' summed losses and image counts
        self.sums = torch.zeros(3 + 2 * QUARTILES, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.started, self.steps, self.away = time.perf_counter(), 0, 0.0

    def add(self, result: StepResult) -> None:
        finite = result.finite
        self.sums += torch.cat(
            [
                torch.stack(
                    [
                        torch.where(finite, result.loss, 0.0),
                        finite.float(),
                        torch.where(finite, result.grad_norm, 0.0),
                    ]
                ),
                torch.where(finite, result.quartile_loss, 0.0),
                torch.where(finite, result.quartile_count, 0.0),
            ]
        )
        self.steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.away += time.perf_counter() - start

    def means(self, runtime: Runtime) -> dict[str, float]:
        """Over the interval's finite steps and over the ranks (a collective: every rank calls it)."""
        sums = runtime.sum(self.sums).tolist()  # the loop's host sync
        loss, finite, norm = sums[:3]
        quartiles, counts = sums[3 : 3 + QUARTILES], sums[3 + QUARTILES :]
        # every rank counts its finite steps, and all hold the norm of the same averaged gradient: the
        # ratios are means over steps and ranks
        row = {"loss": loss / max(finite, 1), "grad_norm": norm / max(finite, 1)}
        for q, (total, n) in enumerate(zip(quartiles, counts, strict=True)):
            row[f"loss_q{q}"] = total / n if n else None
        return row

    def images_per_s(self, batch_size: int) -> float:
        return self.steps * batch_size / (time.perf_counter() - self.started - self.away)


@dataclass(frozen=True)
class Due:
    """What a step ends with: a log line, a checkpoint, a grid, a stop. A stop request (a signal) brings
    the log line and the checkpoint forward to this step; the last step has all of them."""

    log: bool
    checkpoint: bool
    grid: bool
    last: bool
    stop: bool

    @classmethod
    def at(cls, step: int, cfg: DictConfig, stop_requested: bool) -> Due:
        last = step == cfg.steps
        return cls(
            log=step % cfg.log_every == 0 or last or stop_requested,
            checkpoint=bool(cfg.checkpoint_every and step % cfg.checkpoint_every == 0)
            or last
            or stop_requested,
            grid=bool(cfg.sample_every and step % cfg.sample_every == 0) or last,
            last=last,
            stop=stop_requested and not last,
        )
