"""``logger=...``: where a run's metrics rows and sample grids are mirrored besides metrics.jsonl and
samples/. ``tensorboard`` writes <run>/tensorboard/ event files; the package is optional, so it is
imported only when asked for, and its absence is a config error before any work."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ddpm.errors import ConfigError

INSTALL_HINT = (
    "logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' in the ddpm checkout"
)


class Logger(Enum):
    none = "none"
    tensorboard = "tensorboard"


def summary_writer_class() -> type:
    """torch's SummaryWriter, or a ConfigError saying how to install what it needs."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(INSTALL_HINT) from e
    return SummaryWriter


def check_logger(logger: Logger) -> None:
    if logger is Logger.tensorboard:
        summary_writer_class()


class TensorBoard:
    """Every numeric value of a metrics row as a scalar at the row's step (new keys too, such as a future
    fid_*), and each sample grid as an image at its step."""

    def __init__(self, folder: Path, start: int) -> None:
        # A resumed run hides the events a killed run logged after its checkpoint, as metrics.jsonl is
        # wound back to it: TensorBoard then draws each step once.
        purge_step = start + 1 if start > 0 else None
        self.writer = summary_writer_class()(str(folder), purge_step=purge_step)

    def metrics(self, row: dict[str, Any]) -> None:
        step = row["step"]
        for key, value in row.items():
            # None is a timestep quartile that no image fell in; bools are flags, not curves
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()  # a TensorBoard watching the run sees each row as it is logged

    def grid(self, step: int, image: Image.Image) -> None:
        pixels = np.asarray(image)
        self.writer.add_image("samples", pixels, step, dataformats="HW" if pixels.ndim == 2 else "HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
