"""The run directory's bookkeeping: is a run there, writing checkpoints and keeping the newest, winding
metrics.jsonl back to the step a resumed run continues from, and stopping the run when a write fails."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import link_checkpoint, run_dir_of, save_checkpoint
from ddpm.config import ConfigError
from ddpm.files import write_atomically
from ddpm.stopping import TrainingStopped

# What ddpm-train writes; Hydra's own .hydra/ is not a run.
RUN_CONTENT = ("checkpoints", "samples", "metrics.jsonl", "forward.png")
STEP_FILE = re.compile(r"step_(\d+)\.pt")


def holds_run(run_dir: Path) -> bool:
    return any((run_dir / name).exists() for name in RUN_CONTENT)


def refuse_existing_run(run_dir: Path) -> None:
    """A run directory is never overwritten except by a resume of its run."""
    if holds_run(run_dir):
        raise ConfigError(
            f"hydra.run.dir={run_dir} already holds a run: continue it with resume=auto, "
            "or choose another hydra.run.dir"
        )


def remove_partial_writes(run_dir: Path) -> list[Path]:
    """Temporary files a killed run left mid-write (the files they were to replace are whole)."""
    partial = [p for d in ("checkpoints", "samples") for p in (run_dir / d).glob(".*.tmp")]
    for p in partial:
        p.unlink(missing_ok=True)
    return partial


def step_checkpoints(ckpt_dir: Path) -> dict[int, Path]:
    """{step: path} of the step-numbered checkpoints in ckpt_dir."""
    found = {}
    for p in ckpt_dir.glob("step_*.pt"):
        m = STEP_FILE.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    return found


def prune_checkpoints(ckpt_dir: Path, keep_last: int, step: int) -> list[Path]:
    """Delete all but the ``keep_last`` newest step-numbered checkpoints up to ``step`` (0: keep all).
    Later ones, left by a run resumed from an earlier checkpoint, are replaced as the run reaches them."""
    if keep_last <= 0:
        return []
    found = step_checkpoints(ckpt_dir)
    doomed = [found[s] for s in sorted(s for s in found if s <= step)[:-keep_last]]
    for p in doomed:
        p.unlink(missing_ok=True)
    return doomed


def rewind_metrics(metrics: Path, step: int, source: Path | None = None) -> int:
    """Keep the rows of steps <= ``step`` (read from ``source`` when the run continues from another
    run's checkpoint), so the resumed run adds each later step once. Returns the number of rows kept."""
    source = source or metrics
    if not source.is_file():
        metrics.unlink(missing_ok=True)
        return 0
    kept = []
    for line in source.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the last line of a killed run may be cut short
            continue
        if row.get("step", 0) <= step:
            kept.append(line)
    write_atomically(metrics, lambda f: f.write("".join(line + "\n" for line in kept).encode()))
    return len(kept)


def same_run(ckpt: Path, run_dir: Path) -> bool:
    return run_dir_of(ckpt.resolve()) == run_dir.resolve()


def kept_note(last_ckpt: Path | None) -> str:
    return f"the last good checkpoint, {last_ckpt}, is kept" if last_ckpt else "no checkpoint was written yet"


def os_reason(e: OSError) -> str:
    return e.strerror or str(e) or type(e).__name__


@contextmanager
def writing(path: Path, last_ckpt: Path | None) -> Iterator[None]:
    """A file of the run that cannot be written (disk full, permission) stops the run with one line."""
    try:
        yield
    except OSError as e:
        raise TrainingStopped(
            f"could not write {e.filename or path}: {os_reason(e)}; {kept_note(last_ckpt)}; "
            "free space or fix permissions, then resume=auto"
        ) from e


def write_checkpoint(
    ckpt_dir: Path,
    step: int,
    keep_last: int,
    last_ckpt: Path | None,
    model: dict[str, torch.Tensor],
    **payload: Any,
) -> Path:
    """checkpoints/step_<step>.pt, then last.pt pointing at it, then the oldest beyond ``keep_last``
    removed. A failed write stops the run: training on without a safety net would risk more than it saves."""
    path = ckpt_dir / f"step_{step:06d}.pt"
    try:
        save_checkpoint(path, step=step, model=model, **payload)
        link_checkpoint(path, ckpt_dir / "last.pt")
        prune_checkpoints(ckpt_dir, keep_last, step)
    except OSError as e:
        raise TrainingStopped(
            f"could not write the checkpoint {path}: {os_reason(e)}; {kept_note(last_ckpt)}; stopped "
            "rather than train on without one: free space or fix permissions, then resume=auto"
        ) from e
    return path
