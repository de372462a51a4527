"""A function of tensors captured as one CUDA graph and replayed: at the sizes ddpm trains, a step is a
couple of thousand small kernels, and on a GPU the time goes to launching them from Python, not to
arithmetic; a captured step launches with one call. What is captured must never wait for the device (the
training step's lr and EMA weight live in device tensors written before each replay: step.py)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch
from torch.utils import _pytree

REHEARSALS = 3  # calls run (then undone) before capture: allocations, cuDNN's choices, lazy optimizer state

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass
class RehearsalUndo:
    """A copy of the tensors the rehearsals change, to put back in place (the same storage, which a captured
    graph points at); optimizer state that did not exist yet comes back as zeros, which is how Adam starts."""

    held: list[tuple[torch.Tensor, torch.Tensor]]
    optimizer: torch.optim.Optimizer
    had_state: set[int]

    @classmethod
    def take(cls, tensors: Iterable[torch.Tensor], optimizer: torch.optim.Optimizer) -> RehearsalUndo:
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


def rehearse(fn: Callable[[Any], Any], inputs: Any, undo: RehearsalUndo, n: int = REHEARSALS) -> None:
    """Call ``fn(inputs)`` ``n`` times and undo what it did: the run goes on as if it had never been
    called."""
    for _ in range(n):
        fn(inputs)
    undo.restore()


class CapturedGraph(Generic[In, Out]):
    """``fn`` captured as one CUDA graph on static copies of ``example``'s tensors (any pytree: a dataclass
    registered with torch's pytree, tuples, dicts), after rehearsals that ``undo`` takes back. Each call
    copies its inputs into the static buffers and replays; the result's tensors are overwritten by the
    next replay."""

    def __init__(self, fn: Callable[[In], Out], example: In, undo: RehearsalUndo) -> None:
        self.static = _pytree.tree_map(lambda x: x.clone(), example)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), warnings.catch_warnings():  # off the default stream, as capture needs
            warnings.filterwarnings(
                "ignore", message=".*step\\(\\) is running without"
            )  # (it is, rehearsing)
            rehearse(fn, self.static, undo)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.result = fn(self.static)

    def __call__(self, inputs: In) -> Out:
        copy_into(self.static, inputs)
        self.graph.replay()
        return self.result


def copy_into(static: Any, inputs: Any) -> None:
    """Copy every tensor of ``inputs`` into its place in ``static``, a pytree of the same structure."""
    values, spec = _pytree.tree_flatten(inputs)
    buffers, static_spec = _pytree.tree_flatten(static)
    if spec != static_spec:
        raise ValueError(f"the inputs' structure {spec} differs from the captured one {static_spec}")
    for buffer, value in zip(buffers, values, strict=True):
        buffer.copy_(value, non_blocking=True)
