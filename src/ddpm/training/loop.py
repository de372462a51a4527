"""The training loop: ``train(cfg, run_dir)`` = ``setup`` (everything a run needs, checked and built before
the first file is written) + one flat loop whose phases are labelled, writing through a RunWriter."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ddpm.checkpoint import run_dir_of
from ddpm.data import build_dataset
from ddpm.data.order import BatchSampler, DataOrder, apply_flips, shard
from ddpm.data.resident import data_path, resident_for
from ddpm.diffusion.sampling import SamplingOptions, generate
from ddpm.diffusion.schedules import Schedule, build_schedule
from ddpm.images import forward_figure
from ddpm.models import build_model
from ddpm.progress import ProgressReporter
from ddpm.runtime import Runtime, is_peer_failure, seed_everything
from ddpm.trained import TrainedModel
from ddpm.training.accel import prepare_net, training_step
from ddpm.training.ema import EMA
from ddpm.training.interval import Due, Interval
from ddpm.training.plan import RunPlan, plain_config, plan_run, shell_override
from ddpm.training.report import announce, finish, log_progress
from ddpm.training.scores import RunScorer, score_model
from ddpm.training.state import restore, training_state
from ddpm.training.step import (
    StepOptions,
    build_optimizer,
    lr_factor,
    settle_loaded,
    step_draws,
    step_seed,
)
from ddpm.training.stopping import (
    NonFiniteWatch,
    StopRequests,
    TrainingStopped,
    ignore_stop_signals,
)
from ddpm.training.writer import RunWriter, on_cpu
from ddpm.validate import check_data_fits, check_ranks_fit, validate_train


@dataclass
class Run:
    """What a run needs, built by ``setup``; ``start`` is the number of steps already taken."""

    cfg: DictConfig
    plan: RunPlan
    runtime: Runtime
    dataset: Dataset
    order: DataOrder
    schedule: Schedule
    model: nn.Module
    ema: EMA | None
    optimizer: torch.optim.Optimizer
    lr_schedule: torch.optim.lr_scheduler.LambdaLR
    net: nn.Module  # what the step runs: the model under autocast, compiled, DDP-wrapped as the runtime says
    start: int = 0
    elapsed_before: float = 0.0  # training time of the steps taken before a resume
    scorer: RunScorer | None = None  # on the main rank of a run that scores itself
    eval_note: str | None = None  # how the data set changed the run's scoring, for its header

    def sampling_model(self, step: int) -> TrainedModel:
        model, weights = (self.ema.model, "ema") if self.ema is not None else (self.model, "model")
        return TrainedModel.from_config(model, self.schedule, plain_config(self.cfg), step, weights)

    def describe(self) -> str:
        cfg, d = self.cfg, self.cfg.data
        n_params = sum(p.numel() for p in self.model.parameters())
        source = data_path(d, len(self.dataset), self.runtime.device)
        return (
            f"ddpm-train | data {d.name} {d.image_size}x{d.image_size}x{d.channels} ({len(self.dataset):,} "
            f"images, {source}) | U-Net {n_params / 1e6:.2f}M params | "
            f"{cfg.schedule.name} schedule, T={cfg.timesteps} | "
            f"{cfg.objective.name}-prediction, {cfg.loss.name} loss | batch {cfg.batch_size} | "
            f"{cfg.steps} steps | EMA {cfg.ema.decay or 'off'} | sampler {cfg.sampler}, "
            f"{SamplingOptions.from_config(cfg).steps(cfg.timesteps)} steps | "
            f"{self.runtime.describe()} | run dir {self.plan.run_dir}"
        )


def setup(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), sweep_job: int | None = None) -> Run:
    """Plan, check and build the run; nothing is written yet. Under torchrun, every rank builds the same
    objects from the same checkpoint (read to the CPU) and joins the others before anything is written.
    ``sweep_job`` is the job's number in a sweep: it chooses the GPU where several jobs share a machine,
    and eval_at_end=null scores a sweep's jobs."""
    plan = plan_run(cfg, run_dir, overrides)
    cfg = plan.config
    validate_train(cfg)
    runtime = Runtime.for_training(cfg, sweep_job)
    check_ranks_fit(cfg, runtime)
    dataset = build_dataset(cfg.data)
    check_data_fits(cfg, dataset, plan.saved)
    # the main rank alone scores, with no collective inside; built now, so a bad setting fails first
    scorer, eval_note = (
        RunScorer.for_run(cfg, dataset, runtime.device, sweep_job is not None)
        if runtime.is_main
        else (None, None)
    )
    runtime.start(cfg.dist_timeout)

    seed_everything(cfg.seed)
    schedule = build_schedule(cfg.schedule, cfg.timesteps).to(runtime.device)
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size).to(runtime.device)
    optimizer = build_optimizer(model, cfg.lr, runtime.device, capturable=runtime.cuda_graph)
    factor = lambda step: lr_factor(step, cfg.lr_warmup, cfg.lr_decay, cfg.steps)  # noqa: E731
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    order = DataOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.data.hflip)
    start, elapsed_before = 0, 0.0
    if plan.saved is not None:
        ema_model = ema.model if ema is not None else None
        start, elapsed_before = restore(plan.saved, model, ema_model, optimizer, lr_schedule)
        settle_loaded(optimizer, runtime.device, capturable=runtime.cuda_graph)
    # wrapped after the EMA copy and the restore: the EMA averages the plain module's weights
    net = prepare_net(model, runtime)
    return Run(
        cfg,
        plan,
        runtime,
        dataset,
        order,
        schedule,
        model,
        ema,
        optimizer,
        lr_schedule,
        net,
        start,
        elapsed_before,
        scorer,
        eval_note,
    )


def batches(run: Run) -> Iterator[torch.Tensor]:
    """The batches of steps ``start``, ``start + 1``, ... (0-based) on the device, in the data order: from
    the set held on the device (data.on_device), or through a DataLoader."""
    rank, world = run.runtime.rank, run.runtime.world_size
    resident = resident_for(run.cfg.data, run.dataset, run.runtime.device)
    if resident is not None:
        yield from resident.batches(run.order, run.start, rank, world)
        return
    loader = DataLoader(
        run.dataset,
        batch_sampler=BatchSampler(run.order, run.start, run.runtime.rank, run.runtime.world_size),
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.runtime.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
        # its own generator: creating the iterator would otherwise draw a seed from the global RNG, which
        # the resumed run restores before that happens and the uninterrupted one after
        generator=torch.Generator().manual_seed(run.cfg.seed),
    )
    loading = iter(loader)
    try:
        for x0, (_, flips) in zip(loading, run.order.steps(run.start), strict=False):
            yield apply_flips(x0.to(run.runtime.device, non_blocking=True), shard(flips, rank, world))
    finally:
        # the loader's worker processes end with the run, not whenever the collector finds the iterator
        # (a multirun's next job, or a test, would wait seconds for them)
        del loading


def train(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), sweep_job: int | None = None
) -> dict[str, Any]:
    """Train as the config says, or continue the run that ``cfg.resume`` names. ``overrides`` are the
    command line's (a resumed run checks them against its saved config); ``sweep_job`` is the job's number
    in a sweep. Returns a summary; raises TrainingStopped when the run ends early."""
    run = setup(cfg, Path(run_dir), overrides, sweep_job)
    reporter = ProgressReporter(run.cfg.steps, start=run.start, quiet=not run.runtime.is_main)
    try:
        return train_loop(run, reporter)
    except RuntimeError as e:
        if not (run.runtime.distributed and is_peer_failure(e)):
            raise
        last = run.plan.run_dir / "checkpoints" / "last.pt"
        again = f"ddpm-train {shell_override('hydra.run.dir', run.plan.run_dir)} resume=auto"
        stopped = TrainingStopped(
            f"the other ranks stopped answering ({str(e).strip().splitlines()[0]}); the newest checkpoint "
            f"is {last}; continue with: {again}"
        )
        reporter.record(stopped.line("ddpm-train"))
        raise stopped from e
    except TrainingStopped as e:
        reporter.record(e.line("ddpm-train"))  # the command prints it to stderr
        raise
    finally:
        run.runtime.stop()


def train_loop(run: Run, reporter: ProgressReporter) -> dict[str, Any]:
    """The run's steps, reported by ``reporter``; its lines go to train.log once the run directory is
    ready, so a resumed run with nothing left to do writes nothing."""
    cfg, start, runtime = run.cfg, run.start, run.runtime
    if not announce(run, reporter):
        return {
            "steps": start,
            "time_s": 0.0,
            "run_dir": str(run.plan.run_dir),
            "resumed_from": str(run.plan.checkpoint),
        }
    writer = open_writer(run)
    reporter.record_to(run.plan.run_dir / "train.log")
    stream = batches(run)
    x0 = next(stream)
    if runtime.is_main and cfg.forward_n > 0 and start == 0:
        writer.forward(forward_figure(run.schedule, x0[: cfg.forward_n], cfg.seed))

    opts = StepOptions.from_config(cfg)
    batch_shape = (cfg.batch_size, cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    shard_shape = (x0.shape[0], *batch_shape[1:])
    step_fn = training_step(
        run.model, run.net, run.optimizer, run.schedule, run.ema, opts, runtime, shard_shape
    )
    watch = NonFiniteWatch(opts.skip_nonfinite, cfg.max_nonfinite, runtime.device)
    advice = functools.partial(writer.nonfinite_advice, opts.skip_nonfinite)  # built only on a fault
    interval = Interval(runtime.device)
    clock, last_loss, scores = time.perf_counter(), float("nan"), None
    run.model.train()
    with reporter, StopRequests() as stop, writer, contextlib.closing(stream):
        for step in range(start + 1, cfg.steps + 1):
            # Draw the step's t and eps for the whole batch (the same on every rank, each keeps its
            # slice) and seed dropout per (seed, step, rank): the step is the same computation whatever
            # the number of ranks, and a resumed run draws what an uninterrupted one would have.
            t, noise = step_draws(
                cfg.seed, step, batch_shape, cfg.timesteps, opts.offset_noise, runtime.device
            )
            t, noise = (
                shard(t, runtime.rank, runtime.world_size),
                shard(noise, runtime.rank, runtime.world_size),
            )
            torch.manual_seed(step_seed(cfg.seed, step, runtime.rank))
            if run.ema is not None:
                run.ema.at(step)  # the weight of this step's EMA update, written for the step to read
            # Optimizer step and EMA update; nothing here waits for the device.
            result = step_fn(x0, t, noise)
            run.lr_schedule.step()
            watch.record(step, result.finite)
            interval.add(result)
            reporter.advance(step)

            # The flags are read every check_every steps (under torchrun a signal to any rank stops every
            # rank at the same step; one process sees it at once, without waiting for the device).
            flags = step % cfg.check_every == 0 or step == cfg.steps
            signum = runtime.agree_on_signal(stop.signum) if flags or not runtime.distributed else None
            due = Due.at(step, cfg, stop_requested=signum is not None)
            if flags or due.log or due.checkpoint or due.grid:
                watch.check(advice, runtime.max)  # before anything reads or saves the weights
            # Log progress.
            if due.log:
                elapsed = time.perf_counter() - clock
                last_loss = log_progress(run, writer, reporter, interval, step, elapsed, watch.skipped)
            # Save a checkpoint, then draw the grid: a picture must never cost the weights.
            with interval.paused():
                if due.checkpoint:
                    path = save_snapshot(run, writer, step, run.elapsed_before + time.perf_counter() - clock)
                    reporter.say(f"step {step}: checkpoint -> {path}")
                    writer.loss_plot()
                if due.grid and runtime.is_main:
                    draw_grid(run, writer, reporter, step)
                # Score the model (eval_every, eval_at_end), once its weights are saved.
                if run.scorer is not None and run.scorer.due(step, due.last, due.stop):
                    scores = score_model(run.scorer, run.sampling_model(step), writer, reporter) or scores
            # Stop on request, after that checkpoint; a scheduler's notice then goes on to its launcher.
            if due.stop:
                raise stopped_by(signum, stop, step, cfg.steps, writer)
            if not due.last:
                x0 = next(stream)
    return finish(run, writer, reporter, time.perf_counter() - clock, last_loss, watch.skipped, scores)


def stopped_by(signum: int, stop: StopRequests, step: int, steps: int, writer: RunWriter) -> TrainingStopped:
    """The stop a signal asked for, once this step's checkpoint is written; a scheduler's notice then goes
    on to the handler it had before (the launcher's)."""
    then = f"continue with: {writer.resume_hint}"
    if stop.notice is not None:
        then = (
            f"{signal.Signals(stop.notice).name} goes on to the handler it had before "
            "(submitit's requeues the job, and resume=auto continues it)"
        )
    return TrainingStopped(
        f"stopped by {signal.Signals(signum).name} at step {step} of {steps}; checkpoint "
        f"{writer.last_ckpt}; {then}",
        exit_code=128 + signum,
        error=False,
        hand_on=stop.hand_on,
    )


def open_writer(run: Run) -> RunWriter:
    plan = run.plan
    last_ckpt = plan.checkpoint if plan.continues_in_place else None
    writer = RunWriter(
        plan.run_dir, run.cfg.keep_last, last_ckpt, active=run.runtime.is_main, logger=run.cfg.logger
    )
    metrics_source = run_dir_of(plan.checkpoint) / "metrics.jsonl" if plan.fork else None
    writer.open(run.start, plan.checkpoint, metrics_source)
    return writer


def save_snapshot(run: Run, writer: RunWriter, step: int, elapsed_s: float) -> Path:
    """The weights, the EMA and everything exact resume needs, as checkpoints/step_<step>.pt, written by
    the main rank once every rank is seen to hold the same weights."""
    held = list(run.model.state_dict().items())
    if run.ema is not None:
        held += [(f"EMA {k}", v) for k, v in run.ema.state_dict().items()]
    run.runtime.check_identical(held)
    state = training_state(
        run.optimizer, run.lr_schedule, len(run.dataset), run.order.position(step), elapsed_s
    )
    return writer.checkpoint(
        step,
        on_cpu(run.model.state_dict()),
        ema=on_cpu(run.ema.state_dict()) if run.ema is not None else None,
        config=plain_config(run.cfg),
        state=state,
    )


def draw_grid(run: Run, writer: RunWriter, reporter: ProgressReporter, step: int) -> None:
    """samples/step_<step>.png, drawn with the same seed at every step, so successive grids show the same
    x_T maturing. A sampler that fails costs a warning, not the run; a file that cannot be written stops
    it like any other."""
    cfg = run.cfg
    sampling = SamplingOptions.from_config(cfg)
    try:
        images = generate(run.sampling_model(step), sampling, cfg.sample_n, cfg.seed, cfg.sample_batch_size)
    except Exception as e:  # noqa: BLE001 (any sampler fault: the weights are saved, the picture can wait)
        reporter.say(
            f"warning: step {step}: the sample grid could not be drawn ({type(e).__name__}: {e}); training "
            f"goes on; draw it later with: ddpm-sample {shell_override('ckpt', writer.ckpt_dir / 'last.pt')}"
        )
        return
    reporter.say(f"step {step}: samples -> {writer.grid(step, images)}")
