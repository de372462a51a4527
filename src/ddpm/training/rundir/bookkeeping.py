"""The run directory's bookkeeping: is a run there, which step-numbered checkpoints to keep, and winding
metrics.jsonl back to the step a resumed run continues from."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ddpm.checkpoint import run_dir_of
from ddpm.errors import ConfigError
from ddpm.files import write_atomically

# What ddpm-train writes; Hydra's own .hydra/ is not a run.
RUN_CONTENT = ("checkpoints", "samples", "metrics.jsonl", "forward.png", "train.log")
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
    partial = [p for d in (".", "checkpoints", "samples") for p in (run_dir / d).glob(".*.tmp")]
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
