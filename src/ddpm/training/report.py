"""What a run says about itself: its header lines before the first step, a log line and metrics row per
interval, and its closing line."""

from __future__ import annotations

from typing import Any

import torch

from ddpm.progress import ProgressReporter, format_duration
from ddpm.training.cadence import MetricsSinceLog
from ddpm.training.fastpath import FastPath
from ddpm.training.rundir.writer import RunWriter
from ddpm.training.scores import format_scores
from ddpm.training.setup import Run
from ddpm.training.step import logged_lr

# Above this share of the image left in x_T, the run says that sampling from N(0, I) starts off the
# training distribution. It only prints a note: the annotated DDPM's own recipe (T=200) is above it.
SIGNAL_AT_T_NOTE = 0.1


def announce(run: Run, reporter: ProgressReporter) -> bool:
    """The run's header lines; False when a resumed run has nothing left to do."""
    cfg, plan = run.cfg, run.plan
    reporter.say(run.describe())
    for note in run.path_notes:
        reporter.say(note)
    if plan.init is not None:
        reporter.say(plan.init.describe())
        note = plan.init.schedule_note(cfg)
        if note:
            reporter.say(note)
    if plan.checkpoint is not None:
        origin = f" (a run fine-tuned from init={cfg.init})" if cfg.init is not None else ""
        reporter.say(f"resuming from {plan.checkpoint} at step {run.start} of {cfg.steps}{origin}")
    elif cfg.resume == "auto":
        reporter.say(
            f"resume=auto: no checkpoint in {plan.run_dir / 'checkpoints'} yet, so the run starts at step 0 "
            "(to continue an earlier run, give its folder as hydra.run.dir)"
        )
    if run.start >= cfg.steps:
        reporter.say(
            f"the run is complete (step {run.start} of steps={cfg.steps}): nothing to do; a larger "
            "steps= trains on"
        )
        return False
    if run.eval_note:
        reporter.say(run.eval_note)
    if run.scorer is not None:
        reporter.say(run.scorer.describe(plan.run_dir / "eval"))
    signal = run.diffusion.schedule.sqrt_alphas_cumprod[-1].item()
    if signal > SIGNAL_AT_T_NOTE:
        reporter.say(
            f"note: x_T keeps sqrt(abar_T) = {signal:.2f} of the image, while sampling starts from pure "
            "noise; more timesteps or schedule=cosine close that gap (see forward.png)"
        )
    return True


def finish(
    run: Run,
    writer: RunWriter,
    reporter: ProgressReporter,
    elapsed: float,
    last_loss: float,
    skipped: int,
    scores: dict[str, Any] | None,
) -> dict[str, Any]:
    """The closing line, and the summary train() returns."""
    cfg, start = run.cfg, run.start
    summary = {
        "steps": cfg.steps,
        "time_s": elapsed,
        "final_loss": last_loss,
        "skipped": skipped,
        "run_dir": str(run.plan.run_dir),
        "resumed_from": str(run.plan.checkpoint) if run.plan.checkpoint else None,
        "checkpoint": str(writer.ckpt_dir / "last.pt"),
        "samples": str(writer.sample_dir / f"step_{cfg.steps:06d}.png"),
        "scores": scores,
    }
    took = (
        f"steps {start + 1}-{cfg.steps} in {format_duration(elapsed)} "
        f"({format_duration(run.elapsed_before + elapsed)} for all {cfg.steps})"
        if start
        else f"{cfg.steps} steps in {format_duration(elapsed)}"
    )
    skips = f", {skipped} non-finite steps skipped" if skipped else ""
    scored = f" | {format_scores(scores)}" if scores else ""
    reporter.say(
        f"done: {took}, final loss {last_loss:.4f}{skips}{scored} | checkpoint {summary['checkpoint']} | "
        f"samples {summary['samples']} | metrics {writer.metrics_path}"
    )
    if run.runtime.device.type == "cuda":
        torch.cuda.empty_cache()  # multirun jobs share this process: hand the cached blocks back
    return summary


def log_progress(
    run: Run,
    writer: RunWriter,
    reporter: ProgressReporter,
    since_log: MetricsSinceLog,
    step: int,
    elapsed: float,
    skipped: int,
) -> float:
    """The metrics row and the progress line of the interval that ends at ``step`` (a collective: every
    rank calls it); returns the interval's mean loss."""
    cfg = run.cfg
    means = since_log.means(run.runtime)
    img_per_s = since_log.images_per_s(cfg.batch_size)
    row = {"step": step, "loss": means["loss"], "lr": logged_lr(run.optimizer), "img_per_s": img_per_s}
    row["path"] = FastPath.of(run.runtime).name  # the step as it ran: compiled, captured, or eager
    extra = {"elapsed_s": run.elapsed_before + elapsed, "skipped": skipped}
    peak_gb = run.runtime.peak_memory_gb()
    if peak_gb is not None:
        extra["peak_mem_gb"] = peak_gb
    writer.metrics({**row, **extra, **{k: v for k, v in means.items() if k != "loss"}})
    eta = (cfg.steps - step) * elapsed / (step - run.start)
    reporter.log(step, means["loss"], img_per_s, eta, peak_gb)
    since_log.reset()
    return means["loss"]
