"""Where and how the work runs. The device, the process's rank among the training processes and the
numeric precision are decided here and nowhere else; the loop and the commands ask a Runtime."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ddpm.errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def check_device(device: str) -> None:
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"device={device!r} is invalid: choose one of auto, cpu, cuda, cuda:N")


def resolve_device(name: str) -> torch.device:
    """The torch device that a ``device`` key names on this machine; ConfigError if it has none such."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"device={name} is invalid: this machine has {count} GPU(s)")
    return torch.device(name)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0  # this process among world_size training processes
    world_size: int = 1
    precision: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: Any) -> Runtime:
        return cls(device=resolve_device(cfg.device))

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and reports progress."""
        return self.rank == 0

    def describe(self) -> str:
        where = f"device {self.device}"
        if self.world_size > 1:
            where += f" (rank {self.rank} of {self.world_size})"
        return f"{where}, {str(self.precision).removeprefix('torch.')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
