"""The loop's bookkeeping, kept out of the loop so that it reads as the phases of a step: what one step
ends with (``EndOfStep``), and what a log line reports since the previous one (``MetricsSinceLog``)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ddpm.runtime import Runtime
from ddpm.training.step import QUARTILES, Metrics

QUARTILE_KEYS = ("quartile_loss", "quartile_count")


class MetricsSinceLog:
    """What the log line and the metrics row report since the previous one: each loss term's mean over the
    finite steps (``loss`` and any other the Diffusion reports), the mean gradient norm, the loss by
    timestep quartile, and the training throughput; the time spent drawing grids and writing checkpoints
    is left out of the throughput. The sums stay on the device until ``means`` reads them."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.names: list[str] = []  # the step's scalar metrics, in the order of the sums
        self.sums = torch.zeros(0, device=device)
        self.reset()

    def reset(self) -> None:
        self.sums.zero_()
        self.started, self.steps, self.away = time.perf_counter(), 0, 0.0

    def add(self, metrics: Metrics) -> None:
        finite = metrics["finite"]
        if not self.names:  # the first step says what a step reports
            self.names = [k for k in metrics if k not in ("finite", *QUARTILE_KEYS)]
            self.sums = torch.zeros(len(self.names) + 1 + 2 * QUARTILES, device=self.device)
        scalars = [torch.where(finite, metrics[k], 0.0) for k in self.names] + [finite.float()]
        quartiles = [torch.where(finite, metrics[k], 0.0) for k in QUARTILE_KEYS]
        self.sums += torch.cat([torch.stack(scalars), *quartiles])
        self.steps += 1

    @contextmanager
    def paused(self) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.away += time.perf_counter() - start

    def means(self, runtime: Runtime) -> dict[str, float | None]:
        """Over the interval's finite steps and over the ranks (a collective: every rank calls it)."""
        sums = runtime.sum(self.sums).tolist()  # the loop's host sync
        k = len(self.names)
        finite = sums[k]
        quartiles, counts = sums[k + 1 : k + 1 + QUARTILES], sums[k + 1 + QUARTILES :]
        # every rank counts its finite steps, and all hold the norm of the same averaged gradient: the
        # ratios are means over steps and ranks
        row: dict[str, float | None] = {n: v / max(finite, 1) for n, v in zip(self.names, sums, strict=False)}
        for q, (total, n) in enumerate(zip(quartiles, counts, strict=True)):
            row[f"loss_q{q}"] = total / n if n else None
        return row

    def images_per_s(self, batch_size: int) -> float:
        return self.steps * batch_size / (time.perf_counter() - self.started - self.away)


@dataclass(frozen=True)
class EndOfStep:
    """What a step ends with: a log line, a checkpoint, a grid, a stop. A stop request (a signal) brings
    the log line and the checkpoint forward to this step; the last step has all of them."""

    log: bool
    checkpoint: bool
    grid: bool
    last: bool
    stop: bool

    @classmethod
    def at(cls, step: int, cfg: DictConfig, stop_requested: bool) -> EndOfStep:
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
