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
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ddpm.errors import ConfigError

DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


class Precision(Enum):
    """The arithmetic of the U-Net's forward and backward pass. The weights, Adam's moments, the EMA, the
    loss and every x_t stay float32 either way (bf16 autocast with fp32 master weights needs no scaler)."""

    auto = "auto"  # bf16 where the device computes it natively (see native_bf16), fp32 elsewhere
    fp32 = "fp32"
    bf16 = "bf16"


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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes in bf16 natively: a CUDA GPU from Ampere on, or a CPU with AVX512-BF16
    (or AMX). Elsewhere bf16 is emulated and slower than fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return torch.cpu._is_avx512_bf16_supported()


def resolve_precision(precision: Precision, device: torch.device) -> torch.dtype:
    """The autocast dtype that ``precision`` names on ``device``; ConfigError where it has none such. auto
    takes bf16 where the device computes it natively, where it is faster than fp32 to the same quality
    (the figures: README, Speed and Time to quality)."""
    native = native_bf16(device)
    if precision is Precision.auto:
        return torch.bfloat16 if native else torch.float32
    if precision is Precision.bf16 and device.type == "cuda" and not native:
        raise ConfigError(f"precision=bf16 is invalid on {torch.cuda.get_device_name(device)}: choose fp32")
    return torch.bfloat16 if precision is Precision.bf16 else torch.float32


def resolve_compile(value: bool | None, device: torch.device) -> bool:
    """``compile``: null compiles on a GPU, where a step is thousands of tiny kernels; not on the CPU, where
    compiled steps ran slower than eager after minutes of warm-up (the figures: README, Speed)."""
    return device.type == "cuda" if value is None else value


def resolve_cuda_graph(value: bool | None, device: torch.device, world_size: int) -> bool:
    """``cuda_graph``: null captures the step on a GPU when this is the only process; true anywhere else is
    a ConfigError."""
    on_gpu = device.type == "cuda"
    if value and not on_gpu:
        raise ConfigError(f"cuda_graph=true needs a CUDA device, not {device}: use cuda_graph=null")
    if value and world_size > 1:
        raise ConfigError(
            f"cuda_graph=true is invalid under torchrun ({world_size} ranks): a captured step runs on "
            "one process; compile=true still applies"
        )
    return on_gpu and world_size == 1 if value is None else value


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    rank: int = 0  # this process among world_size training processes
    world_size: int = 1
    precision: torch.dtype = torch.float32  # of the U-Net's arithmetic (autocast); weights stay float32
    compile: bool = False  # torch.compile the U-Net
    cuda_graph: bool = False  # capture the whole training step as one CUDA graph

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
        return cls.resolved(device, cfg.precision, cfg.compile, cfg.cuda_graph, rank, world)

    @classmethod
    def resolved(
        cls,
        device: torch.device,
        precision: Precision,
        compile: bool | None,
        cuda_graph: bool | None,
        rank: int = 0,
        world_size: int = 1,
    ) -> Runtime:
        """The runtime that the config keys precision, compile and cuda_graph choose on ``device``."""
        return cls(
            device=device,
            rank=rank,
            world_size=world_size,
            precision=resolve_precision(precision, device),
            compile=resolve_compile(compile, device),
            cuda_graph=resolve_cuda_graph(cuda_graph, device, world_size),
        )

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
        if self.device.type == "cuda":
            # the step's shapes never change, so cuDNN's timed choice of algorithm is made once; what
            # stays fp32 (fp32 runs, the x_t arithmetic) uses TF32 tensor cores, 10 bits of mantissa
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
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

    def peak_memory_gb(self) -> float | None:
        """The most GPU memory the process has held in tensors so far (None on the CPU)."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2**30

    def describe(self) -> str:
        where = f"device {self.device}"
        if self.world_size > 1:
            where += f" (rank {self.rank} of {self.world_size})"
        how = [{torch.float32: "fp32", torch.bfloat16: "bf16"}[self.precision]]
        how += ["compiled" if self.compile else "eager"] + (["CUDA graph"] if self.cuda_graph else [])
        return f"{where}, {', '.join(how)}"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
