"""Where and how the work runs. The device, the process's rank among the training processes and the
numeric precision are decided here and nowhere else; the loop and the commands ask a Runtime.

Under torchrun (WORLD_SIZE > 1 in the environment) every process is one rank: gloo on CPUs, NCCL on
GPUs, one GPU per rank (LOCAL_RANK). Every collective a rank calls is called by every rank at the same
step, never inside a branch that only the main rank takes, and each has a time-out (dist_timeout), so a
rank that dies ends the job with a message instead of a hang.
"""

from __future__ import annotations

import datetime
import os
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddpm.errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


def check_device(device: str) -> None:
    if not re.fullmatch(DEVICE_PATTERN, device):
        raise ConfigError(f"device={device!r} is invalid: choose one of auto, cpu, cuda, cuda:N")


def resolve_device(name: str, sweep_job: int | None = None) -> torch.device:
    """The torch device that a ``device`` key names on this machine; ConfigError if it has none such.

    ``sweep_job`` is the job's number in a sweep (hydra.job.num). A launcher such as joblib runs several
    jobs side by side on one machine, so with ``auto`` and more than one GPU visible, job n takes
    cuda:(n mod the number of GPUs): one GPU each while there are no more jobs at once than GPUs."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        count = torch.cuda.device_count()
        if sweep_job is not None and count > 1:
            return torch.device(f"cuda:{sweep_job % count}")
        return torch.device("cuda")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is available; use device=cpu or device=auto")
        index = torch.device(name).index or 0
        if index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ConfigError(f"device={name} is invalid: this machine has {count} GPU(s)")
    return torch.device(name)


def is_peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank died or hung: gloo reports a closed or reset
    connection as a plain RuntimeError, newer code paths as DistError."""
    text = str(e)
    return isinstance(e, dist.DistError) or (
        isinstance(e, RuntimeError)
        and any(m in text for m in ("gloo", "NCCL", "Connection reset", "closed by peer"))
    )


def launched_ranks() -> tuple[int, int, int]:
    """(rank, local rank, world size) as torchrun (or srun through torchrun) sets them; (0, 0, 1) alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 0, 1
    return int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0")), world


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0  # this process among world_size training processes
    world_size: int = 1
    precision: torch.dtype = torch.float32

    @classmethod
    def from_config(cls, cfg: Any) -> Runtime:
        return cls(device=resolve_device(cfg.device))

    @classmethod
    def for_training(cls, cfg: Any, sweep_job: int | None = None) -> Runtime:
        """This process's share of a training job: under torchrun, its rank, and cuda:LOCAL_RANK where the
        config asks for a GPU; in a sweep, job ``sweep_job``'s GPU (see ``resolve_device``). The process
        group is started with ``start``."""
        rank, local_rank, world = launched_ranks()
        device = resolve_device(cfg.device, sweep_job if world == 1 else None)
        if device.type == "cuda" and world > 1:
            device = resolve_device(f"cuda:{local_rank}")
        return cls(device=device, rank=rank, world_size=world)

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and reports progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def start(self, timeout_s: float) -> None:
        """Make this process's GPU the current one, and join the other ranks (a rendezvous: it returns
        when all have come)."""
        if self.device.type == "cuda" and self.device.index is not None:
            # what takes the current GPU (pinned memory, NCCL) then uses this one, not cuda:0
            torch.cuda.set_device(self.device)
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo",
                rank=self.rank,
                world_size=self.world_size,
                timeout=datetime.timedelta(seconds=timeout_s),
            )

    def stop(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def max(self, values: torch.Tensor) -> torch.Tensor:
        """The elementwise maximum of ``values`` over the ranks (every rank must call it)."""
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.MAX)
        return values

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            values = values.clone()
            dist.all_reduce(values, op=dist.ReduceOp.SUM)
        return values

    def all_true(self, flag: torch.Tensor) -> torch.Tensor:
        """True where ``flag`` is true on every rank."""
        if not self.distributed:
            return flag
        return self.max((~flag).to(torch.int32)) == 0

    def agree_on_signal(self, signum: int | None) -> int | None:
        """The signal any rank was sent (the highest number if several), on every rank: every rank calls
        this at every step, so all stop at the same step."""
        if not self.distributed:
            return signum
        agreed = int(self.max(torch.tensor([signum or 0], device=self.device)))
        return agreed or None

    def check_identical(self, named: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every rank holds the main rank's values (edm's check before each save): DDP keeps the weights
        equal only as long as every rank takes the same steps."""
        if not self.distributed:
            return
        for name, value in named:
            other = value.detach().clone()
            dist.broadcast(other, src=0)
            if not torch.equal(other, value.detach()):
                raise RuntimeError(f"rank {self.rank} holds a different {name} than rank 0")

    def describe(self) -> str:
        where = f"device {self.device}"
        if self.world_size > 1:
            where += f" (rank {self.rank} of {self.world_size})"
        return f"{where}, {str(self.precision).removeprefix('torch.')}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
