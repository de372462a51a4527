"""How the training step is made fast: what the U-Net runs as (bf16 autocast, torch.compile, DDP) and how
a step is launched (eagerly, or replayed as one captured CUDA graph). The Runtime decides; this builds.

At the sizes ddpm trains, a step is a couple of thousand small kernels, and on a GPU the time goes to
launching them from Python, not to arithmetic. Compiling fuses them; capturing the whole step (forward,
backward, clipping, Adam, EMA) as one CUDA graph launches it with one call. Both need a step that never
waits for the device: the learning rate and the EMA weight live in device tensors that are written
before each replay, and a non-finite step is skipped by fused Adam's ``found_inf`` (a masked update)
rather than by reading the flag back (step.py).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ddpm.diffusion.schedules import Schedule
from ddpm.runtime import Runtime
from ddpm.training.ema import EMA
from ddpm.training.step import StepOptions, StepResult, train_step

StepFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], StepResult]  # (x0, t, eps) -> result

REHEARSALS = 3  # steps run (then undone) before capture: allocations, cuDNN's choices, lazy optimizer state


class Autocast(nn.Module):
    """The U-Net under bf16 autocast, giving float32 out, so the loss and everything after it stay fp32."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net, self.dtype = net, dtype

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=self.dtype):
            out = self.net(x, t)
        return out.float()


def prepare_net(model: nn.Module, runtime: Runtime) -> nn.Module:
    """What the step runs: the model under the runtime's precision, compiled where it says, and wrapped for
    DistributedDataParallel on several ranks (outermost, so DDP sees the model's own parameters; its
    gradients are then all-reduced once the compiled backward ends)."""
    net = model if runtime.precision == torch.float32 else Autocast(model, runtime.precision)
    if runtime.compile:
        # static shapes: every batch has batch_size images (partial batches are dropped); one graph per
        # forward where a single process runs it
        net = torch.compile(net, fullgraph=not runtime.distributed, dynamic=False)
    if runtime.distributed:
        device_ids = [runtime.device] if runtime.device.type == "cuda" else None
        net = DistributedDataParallel(net, device_ids=device_ids)
    return net


@dataclass
class Snapshot:
    """A copy of the tensors a step changes, to put back in place (the same storage, which a captured graph
    points at); optimizer state that did not exist yet comes back as zeros, which is how Adam starts."""

    held: list[tuple[torch.Tensor, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    had_state: set[int]

    @classmethod
    def take(cls, tensors: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> Snapshot:
        state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
        held = [(x, x.detach().clone()) for x in [*tensors, *state]]
        return cls(held, optimizer, {id(p) for p in optimizer.state})

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.held:
            live.copy_(saved)
        for p, s in self.optimizer.state.items():
            if id(p) not in self.had_state:
                for v in s.values():
                    if isinstance(v, torch.Tensor):
                        v.zero_()


def rehearse(step: StepFn, args: tuple[torch.Tensor, ...], snapshot: Snapshot, n: int = REHEARSALS) -> None:
    """Run ``step`` ``n`` times and undo what it did: the run goes on as if it had never been called."""
    for _ in range(n):
        step(*args)
    snapshot.restore()


class CapturedStep:
    """The whole step as one CUDA graph, replayed at every step on static input buffers (the Snapshot
    keeps the rehearsal out of the run). The result's tensors are overwritten by the next replay."""

    def __init__(self, step: StepFn, example: tuple[torch.Tensor, ...], snapshot: Snapshot) -> None:
        self.static = tuple(x.clone() for x in example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():  # off the default stream, as capture needs
            warnings.filterwarnings(
                "ignore", message=".*step\\(\\) is running without"
            )  # (it is, rehearsing)
            rehearse(step, self.static, snapshot)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = step(*self.static)

    def __call__(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> StepResult:
        for buffer, value in zip(self.static, (x0, t, noise), strict=True):
            buffer.copy_(value, non_blocking=True)
        self.graph.replay()
        return self.result


def step_tensors(model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a step writes besides the optimizer's state: weights, buffers, the EMA and the lr."""
    tensors = [*model.parameters(), *model.buffers()]
    if ema is not None:
        tensors += [*ema.model.parameters(), ema.weight]
    return tensors + [g["lr"] for g in optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]


def training_step(
    model: nn.Module,
    net: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    ema: EMA | None,
    opts: StepOptions,
    runtime: Runtime,
    shard_shape: tuple[int, ...],
) -> StepFn:
    """One step of Algorithm 1 (``net``, prepare_net's, on this rank's ``shard_shape`` batch) with its EMA
    update, as the loop calls it: eager, or captured as a CUDA graph where the runtime says so. The EMA
    weight of each step is written before the call (``EMA.at``)."""

    def step(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> StepResult:
        result = train_step(net, optimizer, schedule, x0, t, noise, opts, runtime.all_true)
        if ema is not None:
            ema.apply()
        return result

    if not runtime.cuda_graph:
        return step
    device = runtime.device
    example = (
        torch.zeros(shard_shape, device=device),
        torch.randint(0, schedule.timesteps, shard_shape[:1], device=device),
        torch.randn(shard_shape, device=device),
    )
    snapshot = Snapshot.take(step_tensors(model, ema, optimizer), optimizer)
    return CapturedStep(step, example, snapshot)
