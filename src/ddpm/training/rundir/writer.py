"""Everything a run writes into its directory: metrics rows, sample grids, forward.png and checkpoints
(and, with logger=tensorboard, the same rows and grids as TensorBoard events).
A file that cannot be written (disk full, permission) stops the run with one line that says what was
kept and how to go on; a checkpoint is always written whole or not at all."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ddpm.checkpoint import link_checkpoint, save_checkpoint
from ddpm.images import grid_image, save_png
from ddpm.plots import save_loss_plot
from ddpm.training.rundir.bookkeeping import (
    prune_checkpoints,
    remove_partial_writes,
    rewind_metrics,
)
from ddpm.training.rundir.logger import Logger, TensorBoard
from ddpm.training.rundir.plan import shell_override
from ddpm.training.stopping import TrainingStopped


def kept_note(last_ckpt: Path | None) -> str:
    return f"the last good checkpoint, {last_ckpt}, is kept" if last_ckpt else "no checkpoint was written yet"


def os_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


def on_cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state.items()}


class RunWriter:
    """Writes only where ``active`` (the main rank); the others keep the same record of what was written,
    for their messages. With ``logger=tensorboard`` the metrics rows and grids also go to
    <run>/tensorboard/."""

    def __init__(
        self,
        run_dir: Path,
        keep_last: int,
        last_ckpt: Path | None = None,
        active: bool = True,
        logger: Logger = Logger.none,
    ) -> None:
        self.run_dir, self.keep_last, self.active, self.logger = run_dir, keep_last, active, logger
        self.ckpt_dir, self.sample_dir = run_dir / "checkpoints", run_dir / "samples"
        self.metrics_path = run_dir / "metrics.jsonl"
        self.last_ckpt = last_ckpt  # the newest whole checkpoint of this run, named in fault messages
        self._metrics: Any = None
        self._board: TensorBoard | None = None

    @property
    def resume_hint(self) -> str:
        return f"ddpm-train {shell_override('hydra.run.dir', self.run_dir)} resume=auto"

    def nonfinite_advice(self, skipping: bool) -> str:
        """The end of a non-finite step's message: what is kept and how to go on."""
        if skipping:
            return f"{kept_note(self.last_ckpt)}; lower lr or set grad_clip, then {self.resume_hint}"
        return (
            f"{kept_note(self.last_ckpt)}, nothing later was saved; lower lr or set grad_clip "
            f"(or on_nonfinite=skip), then {self.resume_hint}"
        )

    @contextmanager
    def writing(self, path: Path) -> Iterator[None]:
        """A file of the run that cannot be written stops the run with one line."""
        try:
            yield
        except OSError as e:
            raise TrainingStopped(
                f"could not write {e.filename or path}: {os_reason(e)}; {kept_note(self.last_ckpt)}; "
                "free space or fix permissions, then resume=auto"
            ) from e

    def open(self, start: int, resumed_from: Path | None, metrics_source: Path | None) -> None:
        """Make the directory ready for step ``start`` + 1: clear what a killed run left half-written,
        keep the metrics rows up to ``start`` (from ``metrics_source`` when continuing another run's
        checkpoint), and make an earlier checkpoint of this run its newest."""
        if not self.active:
            return
        with self.writing(self.run_dir):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            remove_partial_writes(self.run_dir)
            rewind_metrics(self.metrics_path, start, metrics_source)
            if resumed_from is not None and resumed_from.parent.resolve() == self.ckpt_dir.resolve():
                # back to an earlier checkpoint: from now on it is the run's newest, for resume=auto too
                link_checkpoint(resumed_from, self.ckpt_dir / "last.pt")
            self._metrics = open(self.metrics_path, "a")  # noqa: SIM115 (open for the whole run)
            if self.logger is Logger.tensorboard:
                self._board = TensorBoard(self.run_dir / "tensorboard", start)

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
            self._metrics = None
        if self._board is not None:
            self._board.close()
            self._board = None

    def metrics(self, row: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.writing(self.metrics_path):
            self._metrics.write(json.dumps(row) + "\n")
            self._metrics.flush()
            if self._board is not None:
                self._board.metrics(row)

    def forward(self, figure: Image.Image) -> None:
        path = self.run_dir / "forward.png"
        if not self.active:
            return
        with self.writing(path):
            save_png(figure, path)

    def grid(self, step: int, images: torch.Tensor, ncol: int | None = None) -> Path:
        """samples/step_<step>.png, ``ncol`` images a row (None: a square grid)."""
        path = self.sample_dir / f"step_{step:06d}.png"
        if not self.active:
            return path
        with self.writing(path):
            image = grid_image(images, ncol)
            save_png(image, path)
            if self._board is not None:
                self._board.grid(step, image)
        return path

    def loss_plot(self) -> Path:
        """loss.png from the metrics so far (refreshed at each checkpoint)."""
        path = self.run_dir / "loss.png"
        if self.active:
            self._metrics.flush()
            with self.writing(path):
                save_loss_plot(self.metrics_path, path)
        return path

    def checkpoint(self, step: int, model: dict[str, torch.Tensor], **payload: Any) -> Path:
        """checkpoints/step_<step>.pt, then last.pt pointing at it, then the oldest beyond ``keep_last``
        removed. A failed write stops the run: training on without a safety net would risk more than it
        saves."""
        path = self.ckpt_dir / f"step_{step:06d}.pt"
        if not self.active:
            self.last_ckpt = path
            return path
        try:
            save_checkpoint(path, step=step, model=model, **payload)
            link_checkpoint(path, self.ckpt_dir / "last.pt")
            prune_checkpoints(self.ckpt_dir, self.keep_last, step)
        except OSError as e:
            raise TrainingStopped(
                f"could not write the checkpoint {path}: {os_reason(e)}; {kept_note(self.last_ckpt)}; "
                "stopped rather than train on without one: free space or fix permissions, then resume=auto"
            ) from e
        self.last_ckpt = path
        return path
