"""The training loop: ``train(cfg, run_dir)`` builds schedule, model and data from the config and writes
checkpoints, sample grids, ``forward.png`` and ``metrics.jsonl`` into ``run_dir``."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm.checkpoint import link_checkpoint, run_dir_of
from ddpm.config import ConfigError, Loss, LRDecay, Objective, OnNonFinite
from ddpm.data import build_dataset
from ddpm.diffusion import p_losses
from ddpm.ema import EMA
from ddpm.images import forward_figure, save_grid, save_png
from ddpm.order import BatchSampler, DataOrder, apply_flips
from ddpm.progress import ProgressReporter, format_duration
from ddpm.resume import plan_resume, restore, training_state
from ddpm.rundir import kept_note, remove_partial_writes, rewind_metrics, write_checkpoint, writing
from ddpm.sampling import generate
from ddpm.schedules import Schedule, build_schedule
from ddpm.stopping import NonFiniteWatch, StopRequests, TrainingStopped, ignore_stop_signals
from ddpm.unet import build_model

# Above this share of the image left in x_T, the run says that sampling from N(0, I) starts off the
# training distribution. It only prints a note: the annotated DDPM's own recipe (T=200) is above it.
SIGNAL_AT_T_NOTE = 0.1


@dataclass(frozen=True)
class Runtime:
    """Where the work runs. Device placement, precision and rank are decided here and nowhere else."""

    device: torch.device
    is_main: bool = True  # only the main process writes files


def resolve_device(name: str) -> torch.device:
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batches(
    dataset: Dataset, order: DataOrder, start: int, cfg: Any, runtime: Runtime
) -> Iterator[torch.Tensor]:
    """The batches of steps ``start``, ``start + 1``, ... (0-based) on the device, in the data order."""
    loader = DataLoader(
        dataset,
        batch_sampler=BatchSampler(order, start),
        num_workers=cfg.data.num_workers,
        pin_memory=runtime.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
        # its own generator: creating the iterator would otherwise draw a seed from the global RNG, which
        # the resumed run restores before that happens and the uninterrupted one after
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    for x0, (_, flips) in zip(loader, order.steps(start), strict=False):
        yield apply_flips(x0.to(runtime.device, non_blocking=True), flips)


@dataclass(frozen=True)
class StepOptions:
    """The parts of the config that one training step reads."""

    loss: Loss
    objective: Objective
    min_snr_gamma: float
    offset_noise: float
    grad_accum: int
    grad_clip: float
    skip_nonfinite: bool

    @classmethod
    def from_config(cls, cfg: Any) -> StepOptions:
        skip = cfg.on_nonfinite is OnNonFinite.skip
        return cls(
            cfg.loss, cfg.objective, cfg.min_snr_gamma, cfg.offset_noise, cfg.grad_accum, cfg.grad_clip, skip
        )


def sample_noise(x0: torch.Tensor, offset: float) -> torch.Tensor:
    """eps ~ N(0, I), plus ``offset`` times one N(0, 1) draw per image and channel (offset noise), which
    lets the model change an image's mean brightness."""
    noise = torch.randn_like(x0)
    if offset > 0:
        noise = noise + offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, device=x0.device, dtype=x0.dtype)
    return noise


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    x0: torch.Tensor,
    opts: StepOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step of Algorithm 1 over the batch x0, in ``grad_accum`` micro-batches. Returns the
    loss and whether it and the gradient are finite, as device tensors: reading them forces a host
    synchronisation, so the caller does that only at its logging cadence. With ``skip_nonfinite`` a
    non-finite step changes nothing, which needs that read here, on every step."""
    optimizer.zero_grad(set_to_none=True)
    # t and eps are drawn for the whole batch first, so grad_accum changes memory use, not the result.
    t = torch.randint(0, schedule.timesteps, (x0.shape[0],), device=x0.device)
    noise = sample_noise(x0, opts.offset_noise)
    total = torch.zeros((), device=x0.device)
    for x, tt, eps in zip(
        x0.chunk(opts.grad_accum), t.chunk(opts.grad_accum), noise.chunk(opts.grad_accum), strict=True
    ):
        loss = p_losses(model, schedule, x, tt, eps, opts.loss, opts.objective, opts.min_snr_gamma)
        (loss / opts.grad_accum).backward()
        total += loss.detach() / opts.grad_accum
    params = [p for p in model.parameters() if p.grad is not None]
    if opts.grad_clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, opts.grad_clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    finite = torch.isfinite(total) & torch.isfinite(norm)
    if opts.skip_nonfinite and not bool(finite):
        return total, finite
    optimizer.step()
    return total, finite


def lr_factor(step: int, warmup: int, decay: LRDecay, total: int) -> float:
    """The learning rate of 0-based step ``step`` as a fraction of ``lr``: linear warm-up over ``warmup``
    steps, then constant or a cosine that reaches 0 when training ends (step == total)."""
    if step < warmup:
        return (step + 1) / warmup
    if decay is LRDecay.cosine:
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * progress))
    return 1.0


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as names), safe for weights_only loading."""
    config = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    config.pop("hydra", None)
    return config


def describe(cfg: Any, n_images: int, n_params: int, runtime: Runtime, run_dir: Path) -> str:
    d = cfg.data
    return (
        f"ddpm-train | data {d.name} {d.image_size}x{d.image_size}x{d.channels} ({n_images:,} images) | "
        f"U-Net {n_params / 1e6:.2f}M params | {cfg.schedule.name} schedule, T={cfg.timesteps} | "
        f"{cfg.objective.name}-prediction, {cfg.loss.name} loss | batch {cfg.batch_size} | "
        f"{cfg.steps} steps | EMA {cfg.ema.decay or 'off'} | sampler {cfg.sampler} | "
        f"device {runtime.device} | run dir {run_dir}"
    )


def train(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Train as the config says, or continue the run that ``cfg.resume`` names; every check runs before
    the first file is written. ``overrides`` are the command line's (a resumed run checks them against
    its saved config). Returns a summary; raises TrainingStopped when the run ends early."""
    run_dir, resume = Path(run_dir), cfg.resume
    cfg, resume_from, saved, fork = plan_resume(cfg, run_dir, overrides)
    runtime = Runtime(device=resolve_device(cfg.device))
    dataset = build_dataset(cfg.data)
    if len(dataset) < cfg.batch_size:
        skipped = len(getattr(dataset, "skipped", []))
        unreadable = f", besides {skipped} unreadable files" if skipped else ""
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the data set ({len(dataset)} images{unreadable}): "
            "every step needs a full batch"
        )
    if saved is not None and saved["state"]["data"]["n_images"] != len(dataset):
        raise ConfigError(
            f"data.root={cfg.data.get('root', cfg.data.name)} now holds {len(dataset)} images, but the "
            f"resumed run was trained on {saved['state']['data']['n_images']}: its data order cannot go on"
        )

    seed_everything(cfg.seed)
    schedule = build_schedule(cfg.schedule, cfg.timesteps).to(runtime.device)
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size).to(runtime.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    factor = lambda step: lr_factor(step, cfg.lr_warmup, cfg.lr_decay, cfg.steps)  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    start, elapsed_before = 0, 0.0
    if saved is not None:
        start, elapsed_before = restore(saved, model, ema.model if ema else None, optimizer, lr_schedule)
    sampling_model = ema.model if ema is not None else model
    opts = StepOptions.from_config(cfg)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    config = plain_config(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    order = DataOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.data.hflip)

    reporter = ProgressReporter(cfg.steps, start=start)
    reporter.say(describe(cfg, len(dataset), n_params, runtime, run_dir))
    if saved is not None:
        reporter.say(f"resuming from {resume_from} at step {start} of {cfg.steps}")
    elif resume == "auto":
        reporter.say(
            f"resume=auto: no checkpoint in {run_dir / 'checkpoints'} yet, so the run starts at step 0 "
            "(to continue an earlier run, give its folder as hydra.run.dir)"
        )
    if start >= cfg.steps:
        reporter.say(
            f"the run is complete (step {start} of steps={cfg.steps}): nothing to do; a larger "
            "steps= trains on"
        )
        return {"steps": start, "time_s": 0.0, "run_dir": str(run_dir), "resumed_from": str(resume_from)}
    signal = schedule.sqrt_alphas_cumprod[-1].item()
    if signal > SIGNAL_AT_T_NOTE:
        reporter.say(
            f"note: x_T keeps sqrt(abar_T) = {signal:.2f} of the image, while sampling starts from pure "
            "noise; more timesteps or schedule=cosine close that gap (see forward.png)"
        )

    ckpt_dir, sample_dir = run_dir / "checkpoints", run_dir / "samples"
    metrics_path = run_dir / "metrics.jsonl"
    with writing(run_dir, None):
        run_dir.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(run_dir)
        rewind_metrics(metrics_path, start, run_dir_of(resume_from) / "metrics.jsonl" if fork else None)
        if resume_from is not None and resume_from.parent.resolve() == ckpt_dir.resolve():
            # back to an earlier checkpoint: from now on it is the run's newest, for resume=auto too
            link_checkpoint(resume_from, ckpt_dir / "last.pt")
    stream = batches(dataset, order, start, cfg, runtime)
    x0 = next(stream)
    if runtime.is_main and cfg.forward_n > 0 and start == 0:
        with writing(run_dir / "forward.png", None):
            save_png(forward_figure(schedule, x0[: cfg.forward_n], cfg.seed), run_dir / "forward.png")

    last_ckpt: Path | None = resume_from if not fork else None
    clock = time.perf_counter()

    def checkpoint(step: int) -> Path:
        cpu = lambda state: {k: v.detach().cpu() for k, v in state.items()}  # noqa: E731
        elapsed = elapsed_before + time.perf_counter() - clock
        state = training_state(optimizer, lr_schedule, len(dataset), order.position(step), elapsed)
        ema_weights = cpu(ema.state_dict()) if ema else None
        return write_checkpoint(
            ckpt_dir,
            step,
            cfg.keep_last,
            last_ckpt,
            cpu(model.state_dict()),
            ema=ema_weights,
            config=config,
            state=state,
        )

    def sample_grid(step: int) -> Path:
        path = sample_dir / f"step_{step:06d}.png"
        # The same seed at every step, so successive grids show the same x_T maturing.
        images = generate(
            sampling_model,
            schedule,
            cfg.objective,
            cfg,
            cfg.sample_n,
            shape,
            cfg.seed,
            cfg.batch_size,
            runtime.device,
        )
        with writing(path, last_ckpt):
            save_grid(images, path)
        return path

    model.train()
    interval_start, interval_steps, paused = clock, 0, 0.0
    loss_sum = torch.zeros((), device=runtime.device)
    finite_steps = torch.zeros((), device=runtime.device)
    watch = NonFiniteWatch(opts.skip_nonfinite, cfg.max_nonfinite, runtime.device)
    last_loss = float("nan")
    resume_hint = f"ddpm-train hydra.run.dir={run_dir} resume=auto"

    # the end of a non-finite fault's message, built only when one happens
    def skip_advice() -> str:
        return f"{kept_note(last_ckpt)}; lower lr or set grad_clip, then {resume_hint}"

    def stop_advice() -> str:
        return (
            f"{kept_note(last_ckpt)}, nothing later was saved; lower lr or set grad_clip "
            f"(or on_nonfinite=skip), then {resume_hint}"
        )

    with reporter, StopRequests() as stop, open(metrics_path, "a") as metrics:
        for step in range(start + 1, cfg.steps + 1):
            loss, finite = train_step(model, optimizer, schedule, x0, opts)
            lr_schedule.step()
            if ema is not None:
                ema.update(step)
            watch.record(step, finite, skip_advice)
            loss_sum += torch.where(finite, loss, 0.0)
            finite_steps += finite
            interval_steps += 1
            reporter.advance(step)
            log_due = step % cfg.log_every == 0 or step == cfg.steps or stop.signum is not None
            grid_due = (cfg.sample_every and step % cfg.sample_every == 0) or step == cfg.steps
            ckpt_due = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0) or step == cfg.steps
            if log_due or grid_due or ckpt_due:  # before anything reads or saves the weights
                watch.check(stop_advice)
            if log_due:
                # the loop's host sync: the mean loss of the interval's finite steps
                last_loss = (loss_sum / finite_steps.clamp(min=1)).item()
                now = time.perf_counter()
                # Sampling and checkpointing are not training throughput: their time is left out.
                img_per_s = interval_steps * cfg.batch_size / (now - interval_start - paused)
                row = {
                    "step": step,
                    "loss": last_loss,
                    "lr": cfg.lr * factor(step - 1),  # the rate this step used
                    "img_per_s": img_per_s,
                    "elapsed_s": elapsed_before + now - clock,
                    "skipped": watch.skipped,
                }
                with writing(metrics_path, last_ckpt):
                    metrics.write(json.dumps(row) + "\n")
                    metrics.flush()
                reporter.log(step, last_loss, img_per_s, (cfg.steps - step) * (now - clock) / (step - start))
                loss_sum.zero_()
                finite_steps.zero_()
                interval_start, interval_steps, paused = time.perf_counter(), 0, 0.0
            pause_start = time.perf_counter()
            if grid_due:
                reporter.say(f"step {step}: samples -> {sample_grid(step)}")
            if ckpt_due or stop.signum is not None:
                last_ckpt = checkpoint(step)
                reporter.say(f"step {step}: checkpoint -> {last_ckpt}")
            if stop.signum is not None and step < cfg.steps:  # at the last step, the run is done anyway
                raise TrainingStopped(
                    f"stopped by {stop.name} at step {step} of {cfg.steps}; checkpoint {last_ckpt}; "
                    f"continue with: {resume_hint}",
                    exit_code=128 + stop.signum,
                    error=False,
                )
            paused += time.perf_counter() - pause_start
            if step < cfg.steps:
                x0 = next(stream)

    elapsed = time.perf_counter() - clock
    summary = {
        "steps": cfg.steps,
        "time_s": elapsed,
        "final_loss": last_loss,
        "skipped": watch.skipped,
        "run_dir": str(run_dir),
        "resumed_from": str(resume_from) if resume_from else None,
        "checkpoint": str(ckpt_dir / "last.pt"),
        "samples": str(sample_dir / f"step_{cfg.steps:06d}.png"),
    }
    reporter.say(
        (
            f"done: steps {start + 1}-{cfg.steps} in {format_duration(elapsed)} "
            f"({format_duration(elapsed_before + elapsed)} for all {cfg.steps})"
            if start
            else f"done: {cfg.steps} steps in {format_duration(elapsed)}"
        )
        + f", final loss {last_loss:.4f}"
        + (f", {watch.skipped} non-finite steps skipped" if watch.skipped else "")
        + f" | checkpoint {summary['checkpoint']} | samples {summary['samples']} | metrics {metrics_path}"
    )
    if runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # multirun jobs share this process: hand the cached blocks back
    return summary
