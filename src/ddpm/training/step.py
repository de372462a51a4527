"""One optimizer step of Algorithm 1, whole: its random draws, its learning rate and EMA weight, the loss in
micro-batches, clipping, Adam and the EMA update. The loop calls it as one line, ``train_step(step, batch)``.

A step never waits for the device: the learning rate and the EMA weight are device tensors written before
each step, a non-finite step is skipped by fused Adam itself (``found_inf``), not by reading a flag back,
and what it reports is a dict of device tensors that the loop reads only at its cadence. So the part after
the draws can be captured as one CUDA graph and replayed (capture.py) where the runtime says so."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils import _pytree

from ddpm.data.batch import Batch
from ddpm.data.order import shard
from ddpm.diffusion.gaussian import Diffusion
from ddpm.runtime import Runtime
from ddpm.training.capture import CapturedGraph, RehearsalUndo
from ddpm.training.ema import EMA
from ddpm.training.stopping import OnNonFinite

QUARTILES = 4  # the loss is also reported by timestep quartile, as improved-diffusion's loss_q0..q3

# What a step reports, as device tensors: each loss term's batch mean by its name ("loss", ...), and
# "grad_norm", "finite", "lr", "quartile_loss" / "quartile_count" (the loss summed, and the images
# counted, by the quarter of [0, T) their t fell in).
Metrics = dict[str, torch.Tensor]


class LRDecay(Enum):
    none = "none"
    cosine = "cosine"  # after the warm-up, down to 0 when training ends


def lr_factor(step: int, warmup: int, decay: LRDecay, total: int) -> float:
    """The learning rate of 0-based step ``step`` as a fraction of ``lr``: linear warm-up over ``warmup``
    steps, then constant or a cosine that reaches 0 when training ends (step == total)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay is LRDecay.cosine:
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def build_optimizer(
    model: nn.Module, lr: float, device: torch.device, capturable: bool = False
) -> torch.optim.Adam:
    """Fused Adam (one kernel for every parameter's update, on the CPU as on a GPU) with the learning rate
    in a device tensor, so that the step that reads it can be captured and replayed (``capturable``)."""
    lr_t = torch.tensor(lr, device=device)
    return torch.optim.Adam(model.parameters(), lr=lr_t, fused=True, capturable=capturable)


def lr_to_device(optimizer: torch.optim.Optimizer, device: torch.device, capturable: bool = False) -> None:
    """After load_state_dict, which sets the saved values: the learning rate back into a device tensor (a
    float in checkpoints of earlier versions), and ``capturable`` as this run needs it."""
    for group in optimizer.param_groups:
        group["lr"] = torch.as_tensor(group["lr"], dtype=torch.float32).to(device)
        group["capturable"] = capturable


def logged_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate the last step took, as the shortest decimal of its float32 value (a host read:
    for the log line only)."""
    return float(str(np.float32(float(optimizer.param_groups[0]["lr"]))))


def step_seed(*keys: int) -> int:
    """A seed that is a pure function of ``keys`` (seed, step[, rank]), well mixed (numpy's SeedSequence),
    so that neighbouring steps draw unrelated numbers."""
    words = np.random.SeedSequence([k % 2**63 for k in keys]).generate_state(2, np.uint32)
    return int(words[0]) << 31 | int(words[1]) >> 1


@dataclass(frozen=True)
class StepOptions:
    """The parts of the config that one training step reads besides the Diffusion's."""

    seed: int
    batch_size: int  # the global batch, over every rank
    lr: float
    lr_warmup: int
    lr_decay: LRDecay
    steps: int
    grad_accum: int
    grad_clip: float
    skip_nonfinite: bool
    num_classes: int | None = None  # a class-conditional run's; its null label is num_classes
    cond_drop_prob: float = 0.0  # the chance that a label is replaced by the null label

    @classmethod
    def from_config(cls, cfg: Any, num_classes: int | None = None) -> StepOptions:
        skip = cfg.on_nonfinite is OnNonFinite.skip
        return cls(
            cfg.seed,
            cfg.batch_size,
            cfg.lr,
            cfg.lr_warmup,
            cfg.lr_decay,
            cfg.steps,
            cfg.grad_accum,
            cfg.grad_clip,
            skip,
            num_classes,
            cfg.cond_drop_prob if num_classes is not None else 0.0,
        )


@dataclass(frozen=True)
class StepInputs:
    """What the optimizing part of a step reads: this rank's batch with its t and eps."""

    batch: Batch
    t: torch.Tensor
    noise: torch.Tensor


_pytree.register_dataclass(StepInputs)  # its tensors are a captured graph's static buffers


def step_draws(
    diffusion: Diffusion,
    seed: int,
    step: int,
    shape: tuple[int, ...],
    device: torch.device,
    cond_drop_prob: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """t, eps and, for a conditional run (``cond_drop_prob`` given), the mask of the labels to drop, of
    (1-based) step ``step`` for the whole global batch of ``shape``, from a generator keyed on (seed,
    step): every rank draws the same numbers and keeps its slice, so a step computes the same whatever the
    number of ranks, and a resumed run draws what an uninterrupted one would have. The mask comes after t
    and eps, so an unconditional run draws what it drew before conditioning existed."""
    generator = torch.Generator(device=device).manual_seed(step_seed(seed, step))
    t = torch.randint(0, diffusion.timesteps, (shape[0],), generator=generator, device=device)
    noise = diffusion.noise(shape, generator, device)
    if cond_drop_prob is None:
        return t, noise, None
    drop = torch.rand(shape[0], generator=generator, device=device) < cond_drop_prob
    return t, noise, drop


class TrainStep:
    """Algorithm 1's optimizer step on ``net`` (the network as prepare_net runs it) with the EMA update,
    eager or, where the runtime says so, captured as one CUDA graph at the first call."""

    def __init__(
        self,
        model: nn.Module,
        net: nn.Module,
        optimizer: torch.optim.Optimizer,
        diffusion: Diffusion,
        ema: EMA | None,
        opts: StepOptions,
        runtime: Runtime,
    ) -> None:
        self.model, self.net, self.optimizer, self.diffusion = model, net, optimizer, diffusion
        self.ema, self.opts, self.runtime = ema, opts, runtime
        lr = optimizer.param_groups[0]["lr"]
        self.base_lr = torch.tensor(opts.lr, dtype=lr.dtype, device=lr.device)
        self.update = None if runtime.cuda_graph else self.optimize

    def __call__(self, step: int, batch: Batch) -> Metrics:
        """Step ``step`` (1-based) on this rank's ``batch``."""
        if self.update is None:  # captured before the first step's draws, which seed dropout
            self.update = self.capture(batch)
        inputs = self.draws(step, batch)
        self.set_step(step)
        return self.update(inputs)

    def draws(self, step: int, batch: Batch) -> StepInputs:
        """The step's t and eps (this rank's slice of the global batch's), a conditional run's labels with
        the dropped ones replaced by the null label, and dropout seeded per (seed, step, rank): the step
        is the same computation whatever the number of ranks."""
        o, rank, world = self.opts, self.runtime.rank, self.runtime.world_size
        shape = (o.batch_size, *batch.images.shape[1:])
        drop_prob = o.cond_drop_prob if o.num_classes is not None else None
        t, noise, drop = step_draws(self.diffusion, o.seed, step, shape, batch.images.device, drop_prob)
        batch = self.step_batch(batch)
        if drop is not None:
            if batch.labels is None:
                raise ValueError("a class-conditional step needs the batch's labels")
            batch = Batch(batch.images, batch.labels.masked_fill(shard(drop, rank, world), o.num_classes))
        torch.manual_seed(step_seed(o.seed, step, rank))
        return StepInputs(batch, shard(t, rank, world), shard(noise, rank, world))

    def step_batch(self, batch: Batch) -> Batch:
        """The batch as the step reads it: a labelled set's labels are no input of an unconditional step,
        nor of its captured graph, whose inputs keep the structure they were captured with."""
        return batch if self.opts.num_classes is not None else Batch(batch.images)

    def set_step(self, step: int) -> None:
        """Write step ``step``'s learning rate and EMA weight into the device tensors the step reads (the
        lr as LambdaLR computed it: the float32 lr times the step's factor)."""
        o = self.opts
        factor = lr_factor(step - 1, o.lr_warmup, o.lr_decay, o.steps)
        for group in self.optimizer.param_groups:
            group["lr"].copy_(self.base_lr * factor)
        if self.ema is not None:
            self.ema.at(step)

    def optimize(self, inputs: StepInputs) -> Metrics:
        """The gradient of the batch's mean loss in grad_accum micro-batches (t and eps come for the whole
        batch, so grad_accum changes memory use, not the result; DDP's all-reduce waits for the last one),
        clipped, and one Adam step with the EMA update. With skip_nonfinite, a non-finite step changes
        nothing: fused Adam leaves the weights, its moments and its step count as they were where
        ``found_inf`` is set, from a finite flag that every rank agrees on."""
        opts, optimizer, n = self.opts, self.optimizer, self.opts.grad_accum
        device = inputs.noise.device
        optimizer.zero_grad(set_to_none=True)
        no_sync = getattr(self.net, "no_sync", None)  # DistributedDataParallel's
        means: Metrics = {}
        quartile_loss = torch.zeros(QUARTILES, device=device)
        quartile_count = torch.zeros(QUARTILES, device=device)
        parts = list(zip(inputs.batch.chunk(n), inputs.t.chunk(n), inputs.noise.chunk(n), strict=True))
        for i, (part, t, noise) in enumerate(parts):
            last = i + 1 == len(parts)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                terms = self.diffusion.training_losses(self.net, part.images, t, noise, part.labels)
                loss = terms["loss"].mean()
                (loss / n).backward()
            for name, per_image in terms.items():
                mean = loss if name == "loss" else per_image.mean()
                means[name] = means.get(name, torch.zeros((), device=device)) + mean.detach() / n
            quartile = t * QUARTILES // self.diffusion.timesteps
            quartile_loss.index_add_(0, quartile, terms["loss"].detach())
            quartile_count.index_add_(0, quartile, torch.ones_like(terms["loss"]))
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if opts.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        finite = torch.isfinite(means["loss"]) & torch.isfinite(norm)
        if opts.skip_nonfinite:
            finite = self.runtime.all_true(finite)
            optimizer.found_inf = (~finite).float()  # type: ignore[attr-defined] (read by fused Adam)
        optimizer.step()
        if self.ema is not None:
            self.ema.apply()
        return {
            **means,
            "grad_norm": norm,
            "finite": finite,
            "quartile_loss": quartile_loss,
            "quartile_count": quartile_count,
        }

    def capture(self, batch: Batch) -> CapturedGraph:
        """``optimize`` as one CUDA graph on static buffers shaped as this rank's batches, after rehearsals
        that leave no trace (RehearsalUndo)."""
        t = torch.zeros(batch.size, dtype=torch.long, device=batch.images.device)
        example = StepInputs(
            _pytree.tree_map(torch.zeros_like, self.step_batch(batch)), t, torch.zeros_like(batch.images)
        )
        undo = RehearsalUndo.take(step_tensors(self.model, self.ema, self.optimizer), self.optimizer)
        return CapturedGraph(self.optimize, example, undo)


def step_tensors(model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor a step writes besides the optimizer's state: weights, buffers, the EMA and the lr."""
    tensors = [*model.parameters(), *model.buffers()]
    if ema is not None:
        tensors += [*ema.model.parameters(), ema.weight]
    return tensors + [g["lr"] for g in optimizer.param_groups if isinstance(g["lr"], torch.Tensor)]
