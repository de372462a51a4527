"""The fast path, checked before it is trusted. A run whose runtime compiles the U-Net or captures the step
builds that step first and compares its first step with the eager step on the same inputs: one exception
while compiling or capturing, a non-finite loss or gradient, or a loss outside the precision's tolerance,
and the run falls back (compiled without the graph, then eager) with one warning line. Where the config
asked for the path itself (compile=true, cuda_graph=true), the failure is a one-line error instead.

The check leaves no trace: weights, EMA, optimizer state, learning rate and every RNG are as they were,
so a run that checks and one that resumes compute the same steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion
from ddpm.errors import ConfigError
from ddpm.runtime import Runtime
from ddpm.training.accel import distribute, fast_net, prepare_net
from ddpm.training.capture import RehearsalUndo
from ddpm.training.ema import EMA
from ddpm.training.step import StepInputs, StepOptions, TrainStep, step_tensors

# How far the fast step's loss may be from the eager one's, relative to it. fp32: the compiled kernels add
# in other orders and fuse the loss (a few float32 epsilons per reduction, far below 1e-3 over a network);
# bf16: every product is rounded to 8 bits on both paths, in other places (a few 1e-3 per layer).
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 5e-2}
CHECK_SEED = 0x5EED  # the check's own inputs, drawn from a private generator: no RNG of the run moves


@dataclass(frozen=True)
class FastPath:
    compile: bool
    cuda_graph: bool

    @property
    def name(self) -> str:
        parts = (["compiled"] if self.compile else []) + (["CUDA graph"] if self.cuda_graph else [])
        return " + ".join(parts) or "eager"

    @property
    def eager(self) -> bool:
        return not (self.compile or self.cuda_graph)

    @classmethod
    def of(cls, runtime: Runtime) -> FastPath:
        return cls(runtime.compile, runtime.cuda_graph)


def candidates(chosen: FastPath, asked_compile: bool, asked_graph: bool) -> list[FastPath]:
    """The paths to try, fastest first: the runtime's, then without the graph, then eager; none drops
    what the config asked for by name. A captured step without compilation is tried only where that is
    what was chosen or asked for."""
    out = []
    for compile_, graph in ((True, True), (True, False), (False, True), (False, False)):
        if (compile_ and not chosen.compile) or (graph and not chosen.cuda_graph):
            continue
        if (asked_compile and not compile_) or (asked_graph and not graph):
            continue
        if graph and not compile_ and chosen.compile and not asked_graph:
            continue
        out.append(FastPath(compile_, graph))
    return out


@dataclass
class Untouched:
    """What a check must put back: the step's tensors (RehearsalUndo: in place, as a captured graph needs),
    the optimizer state it created, and the Python, NumPy and torch RNGs."""

    undo: RehearsalUndo
    optimizer: torch.optim.Optimizer
    rng: tuple[object, ...]
    cuda_rng: list[torch.Tensor] | None

    @classmethod
    def take(cls, model: nn.Module, ema, optimizer: torch.optim.Optimizer) -> Untouched:
        undo = RehearsalUndo.take(step_tensors(model, ema, optimizer), optimizer)
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
        return cls(undo, optimizer, (random.getstate(), np.random.get_state(), torch.get_rng_state()), cuda)

    def restore(self) -> None:
        self.undo.restore()
        python, numpy, cpu = self.rng
        random.setstate(python)  # type: ignore[arg-type]
        np.random.set_state(numpy)  # type: ignore[arg-type]
        torch.set_rng_state(cpu)  # type: ignore[arg-type]
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)

    def forget_new_state(self) -> None:
        """Drop the optimizer state the check created (zeros, as Adam starts): an uncaptured step creates
        its own, so the optimizer is as if the check had never run."""
        for p in list(self.optimizer.state):
            if id(p) not in self.undo.had_state:
                del self.optimizer.state[p]


def check_inputs(shape: tuple[int, ...], timesteps: int, num_classes: int | None, device) -> StepInputs:
    """Inputs shaped as this rank's batches, from a generator of the check's own."""
    g = torch.Generator().manual_seed(CHECK_SEED)
    images = torch.rand(shape, generator=g) * 2 - 1
    labels = torch.randint(0, num_classes + 1, (shape[0],), generator=g) if num_classes is not None else None
    t = torch.randint(0, timesteps, (shape[0],), generator=g)
    noise = torch.randn(shape, generator=g)
    inputs = StepInputs(Batch(images, labels), t, noise)
    return StepInputs(inputs.batch.to(device), t.to(device), noise.to(device))


@contextlib.contextmanager
def dropout_off(model: nn.Module, active: bool) -> Iterator[None]:
    """Eval mode for the comparison where the model has dropout: compiled kernels draw other numbers."""
    was = model.training
    if active:
        model.eval()
    try:
        yield
    finally:
        model.train(was)


def has_dropout(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in model.modules())


def run_once(step: TrainStep, path: FastPath, inputs: StepInputs) -> tuple[float, bool]:
    """The loss of one step on ``inputs`` as ``path`` runs it, and whether it and the gradient are finite."""
    if path.cuda_graph:
        graph = step.capture(inputs.batch)  # in the model's mode now: the run's graph, or the check's
        metrics = graph(inputs)
    else:
        graph, metrics = None, step.optimize(inputs)
    loss = float(metrics["loss"])
    finite = bool(torch.isfinite(metrics["loss"]) & torch.isfinite(metrics["grad_norm"]))
    if graph is not None and step.update is None:
        step.update = graph  # the run keeps the graph it was checked with
    return loss, finite


def check_path(
    build: Callable[[FastPath], TrainStep],
    path: FastPath,
    eager: TrainStep,
    inputs: StepInputs,
    untouched: Untouched,
    tolerance: float,
) -> tuple[TrainStep | None, str | None]:
    """The path's step, if its first step runs and matches the eager step's loss; else None and why. The
    first step runs in training mode, as the run will; with dropout in the model, the comparison runs again
    with it off on both paths (a recompilation, or a second capture that is then dropped)."""
    model = eager.model
    dropout = has_dropout(model)
    try:
        step = build(path)
        loss, finite = run_once(step, path, inputs)
        untouched.restore()
        if not finite:
            return None, f"its first loss or gradient is not finite (loss {loss})"
        if dropout:
            with dropout_off(model, True):
                loss, _ = run_once(step, path, inputs)
            untouched.restore()
        with dropout_off(model, dropout):
            reference = float(eager.optimize(inputs)["loss"])
        untouched.restore()
    except Exception as e:  # compiling or capturing fails in many ways: each costs a fallback, not the run
        untouched.restore()
        lines = str(e).strip().splitlines()
        return None, f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
    if not abs(loss - reference) <= tolerance * abs(reference) + 1e-6:
        return (
            None,
            f"its loss {loss:.6g} is not the eager step's {reference:.6g} (relative tolerance {tolerance:g})",
        )
    return step, None


def choose_step(
    chosen: FastPath,
    asked_compile: bool,
    asked_graph: bool,
    build: Callable[[FastPath], TrainStep],
    inputs: StepInputs,
    untouched: Untouched,
    runtime: Runtime,
) -> tuple[TrainStep, FastPath, list[str]]:
    """The fastest path that passes its check, every rank agreeing, and the warnings of those that did
    not; ConfigError where a path the config named fails."""
    eager = build(FastPath(False, False))
    tolerance = TOLERANCE[runtime.precision]
    notes: list[str] = []
    paths = candidates(chosen, asked_compile, asked_graph)
    for i, path in enumerate(paths):
        if path.eager:
            return eager, path, notes
        step, why = check_path(build, path, eager, inputs, untouched, tolerance)
        ok = bool(runtime.all_true(torch.tensor(why is None, device=runtime.device)))
        if ok and step is not None:
            if not path.cuda_graph:
                untouched.forget_new_state()
            return step, path, notes
        why = why or "another rank's check failed"
        if i + 1 == len(paths):
            named = [k for k, on in (("compile", asked_compile), ("cuda_graph", asked_graph)) if on]
            raise ConfigError(
                f"{' and '.join(f'{k}=true' for k in named)}: the {path.name} step failed its check before "
                f"the first step ({why}); {' or '.join(f'{k}=null' for k in named)} falls back instead"
            )
        notes.append(f"warning: the {path.name} step failed its check ({why}); training {paths[i + 1].name}")
    raise AssertionError("unreachable: the last candidate returns or raises")


def checked_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    diffusion: Diffusion,
    ema: EMA | None,
    opts: StepOptions,
    runtime: Runtime,
    image_shape: tuple[int, int, int],
    asked: tuple[bool, bool],
) -> tuple[TrainStep, Runtime, list[str]]:
    """The run's TrainStep on the fastest path that passes its check (``asked``: compile=true and
    cuda_graph=true given by name), the runtime it runs as, and the fallbacks' warnings."""
    chosen = FastPath.of(runtime)
    if chosen.eager:
        net = prepare_net(model, runtime)
        return TrainStep(model, net, optimizer, diffusion, ema, opts, runtime), runtime, []

    def build(path: FastPath) -> TrainStep:
        rt = dataclasses.replace(runtime, compile=path.compile, cuda_graph=path.cuda_graph)
        for group in optimizer.param_groups:  # capturable Adam only where the step is captured
            group["capturable"] = path.cuda_graph
        if not runtime.distributed:
            return TrainStep(model, fast_net(model, rt), optimizer, diffusion, ema, opts, rt)
        # under torchrun the check runs on this rank alone (no DDP, no all-reduce), so a rank whose check
        # fails leaves none of the others waiting inside a collective; they agree on the outcome after
        alone = dataclasses.replace(rt, rank=0, world_size=1)
        local = dataclasses.replace(opts, skip_nonfinite=False)
        return TrainStep(model, fast_net(model, rt), optimizer, diffusion, ema, local, alone)

    shape = (opts.batch_size // runtime.world_size, *image_shape)
    inputs = check_inputs(shape, diffusion.timesteps, opts.num_classes, runtime.device)
    untouched = Untouched.take(model, ema, optimizer)
    step, path, notes = choose_step(chosen, *asked, build, inputs, untouched, runtime)
    rt = dataclasses.replace(runtime, compile=path.compile, cuda_graph=path.cuda_graph)
    for group in optimizer.param_groups:  # as the chosen path needs, whichever candidate was built last
        group["capturable"] = path.cuda_graph
    if runtime.distributed:  # the checked network, now inside DDP, with the run's own options
        step = TrainStep(model, distribute(step.net, rt), optimizer, diffusion, ema, opts, rt)
    return step, rt, notes
