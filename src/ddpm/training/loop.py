"""The training loop: ``train(cfg, run_dir)`` = ``setup`` (setup.py: everything a run needs, checked and
built before the first file is written) + one flat loop whose phases are labelled, writing through a
RunWriter. Each step is one call, ``run.train_step(step, batch)`` (step.py)."""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from ddpm.checkpoint import run_dir_of
from ddpm.conditioning import grid_rows
from ddpm.data.batch import Batch
from ddpm.data.order import BatchSampler, apply_flips, shard
from ddpm.data.resident import resident_for
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.images import forward_figure
from ddpm.progress import ProgressReporter
from ddpm.runtime import is_peer_failure
from ddpm.training.cadence import EndOfStep, MetricsSinceLog
from ddpm.training.report import announce, finish, log_progress
from ddpm.training.rundir.plan import plain_config, shell_override
from ddpm.training.rundir.state import training_state
from ddpm.training.rundir.writer import RunWriter, on_cpu
from ddpm.training.scores import score_model
from ddpm.training.setup import Run, setup
from ddpm.training.stopping import (
    NonFiniteWatch,
    StopRequests,
    TrainingStopped,
    ignore_stop_signals,
)


def batches(run: Run) -> Iterator[Batch]:
    """This rank's batches of steps ``start``, ``start + 1``, ... (0-based) on the device, in the data
    order: from the set held on the device (data.on_device), or through a DataLoader."""
    rank, world = run.runtime.rank, run.runtime.world_size
    resident = resident_for(run.cfg.data, run.dataset, run.runtime.device)
    if resident is not None:
        yield from resident.batches(run.order, run.start, rank, world)
        return
    loader = DataLoader(
        run.dataset,
        batch_sampler=BatchSampler(run.order, run.start, run.runtime.rank, run.runtime.world_size),
        collate_fn=Batch.collate,
        num_workers=run.cfg.data.num_workers,
        pin_memory=run.runtime.device.type == "cuda",
        worker_init_fn=ignore_stop_signals,
        # its own generator: creating the iterator would otherwise draw a seed from the global RNG, which
        # the resumed run restores before that happens and the uninterrupted one after
        generator=torch.Generator().manual_seed(run.cfg.seed),
    )
    loading = iter(loader)
    try:
        for loaded, (_, flips) in zip(loading, run.order.steps(run.start), strict=False):
            batch = loaded.to(run.runtime.device, non_blocking=True)
            yield Batch(apply_flips(batch.images, shard(flips, rank, world)), batch.labels)
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
    batch = next(stream)
    if runtime.is_main and cfg.forward_n > 0 and start == 0:
        writer.forward(forward_figure(run.diffusion, batch.images[: cfg.forward_n], cfg.seed))

    skipping = run.train_step.opts.skip_nonfinite
    watch = NonFiniteWatch(skipping, cfg.max_nonfinite, runtime.device)
    advice = functools.partial(writer.nonfinite_advice, skipping)  # built only on a fault
    since_log = MetricsSinceLog(runtime.device)
    clock, last_loss, scores = time.perf_counter(), float("nan"), None
    run.model.train()
    with reporter, StopRequests() as stop, writer, contextlib.closing(stream):
        for step in range(start + 1, cfg.steps + 1):
            # One optimizer step with its own draws, lr and EMA update; nothing here waits for the device.
            metrics = run.train_step(step, batch)
            watch.record(step, metrics["finite"])
            since_log.add(metrics)
            reporter.advance(step)

            # The flags are read every check_every steps (under torchrun a signal to any rank stops every
            # rank at the same step; one process sees it at once, without waiting for the device).
            flags = step % cfg.check_every == 0 or step == cfg.steps
            signum = runtime.agree_on_signal(stop.signum) if flags or not runtime.distributed else None
            due = EndOfStep.at(step, cfg, stop_requested=signum is not None)
            if flags or due.log or due.checkpoint or due.grid:
                watch.check(advice, runtime.max)  # before anything reads or saves the weights
            # Log progress.
            if due.log:
                elapsed = time.perf_counter() - clock
                last_loss = log_progress(run, writer, reporter, since_log, step, elapsed, watch.skipped)
            # Save a checkpoint, then draw the grid: a picture must never cost the weights.
            with since_log.paused():
                if due.checkpoint:
                    path = save_checkpoint(
                        run, writer, step, run.elapsed_before + time.perf_counter() - clock
                    )
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
                batch = next(stream)
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
        pass_notice_on=stop.pass_notice_on,
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


def save_checkpoint(run: Run, writer: RunWriter, step: int, elapsed_s: float) -> Path:
    """The weights, the EMA and everything exact resume needs, as checkpoints/step_<step>.pt, written by
    the main rank once every rank is seen to hold the same weights."""
    held = list(run.model.state_dict().items())
    if run.ema is not None:
        held += [(f"EMA {k}", v) for k, v in run.ema.state_dict().items()]
    run.runtime.check_identical(held)
    state = training_state(run.optimizer, len(run.dataset), run.order.position(step), elapsed_s)
    return writer.checkpoint(
        step,
        on_cpu(run.model.state_dict()),
        ema=on_cpu(run.ema.state_dict()) if run.ema is not None else None,
        config=plain_config(run.cfg),
        state=state,
        class_names=run.class_names,
    )


def draw_grid(run: Run, writer: RunWriter, reporter: ProgressReporter, step: int) -> None:
    """samples/step_<step>.png, drawn with the same seed at every step, so successive grids show the same
    x_T maturing. A sampler that fails costs a warning, not the run; a file that cannot be written stops
    it like any other."""
    cfg = run.cfg
    sampling = SamplingOptions.from_config(cfg)
    n, labels, ncol = cfg.sample_n, None, None
    if run.class_names is not None:  # one row per class
        labels, ncol = grid_rows(len(run.class_names), cfg.sample_n)
        n = labels.numel()
    try:
        images = generate(run.sampling_model(step), sampling, n, cfg.seed, cfg.sample_batch_size, labels)
    except Exception as e:  # noqa: BLE001 (any sampler fault: the weights are saved, the picture can wait)
        reporter.say(
            f"warning: step {step}: the sample grid could not be drawn ({type(e).__name__}: {e}); training "
            f"goes on; draw it later with: ddpm-sample {shell_override('ckpt', writer.ckpt_dir / 'last.pt')}"
        )
        return
    reporter.say(f"step {step}: samples -> {writer.grid(step, images, ncol)}")
