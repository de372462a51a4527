"""A sweep's answer: one row per run of a folder (a Hydra sweep, or any folder of runs), written as
summary.csv, summary.md and summary.png. ``ddpm-summary DIR`` rebuilds them; a multirun writes them when
it ends."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
import textwrap
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from ddpm.errors import ConfigError
from ddpm.files import write_atomically
from ddpm.plots import read_metrics, smoothed

FIELDS = (
    "run",
    "overrides",
    "data",
    "steps",
    "final_loss",
    "img_per_s",
    "fid",
    "kid",
    "fid_floor",
    "class_accuracy",
    "bpd",
    "wall_s",
    "grid",
)


@dataclass
class RunRow:
    run: str  # the run directory, relative to the summarised folder
    overrides: str  # the command line's overrides that made this run differ
    data: str
    steps: int
    final_loss: float | None
    img_per_s: float | None  # median over the logged intervals
    fid: float | None  # from the run's newest eval.json, classifier features first
    kid: float | None
    fid_floor: float | None  # real images against the same reals, as many as were scored: the best FID
    class_accuracy: float | None  # a conditional model's: samples the classifier puts in the class asked for
    bpd: float | None  # the likelihood bound in bits/dim, where the newest eval.json has one (nll=true)
    wall_s: float | None  # training time, resumes included
    grid: str  # the newest sample grid


def find_runs(folder: Path) -> list[Path]:
    """The run directories under ``folder`` (any depth): those with a metrics.jsonl."""
    return sorted(p.parent for p in folder.rglob("metrics.jsonl"))


def newest_eval(run: Path) -> dict | None:
    """The eval.json of the latest step (a run's own eval/step_*, or ddpm-eval's), the newest of a step."""
    found = []
    for path in run.glob("eval/*/eval.json"):
        report = json.loads(path.read_text())
        found.append((report.get("source", {}).get("step", -1), path.stat().st_mtime, report))
    return max(found, key=lambda f: f[:2])[2] if found else None


def run_row(run: Path, folder: Path) -> RunRow:
    rows = read_metrics(run / "metrics.jsonl")
    config_file, overrides_file = run / ".hydra/config.yaml", run / ".hydra/overrides.yaml"
    config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
    overrides = yaml.safe_load(overrides_file.read_text()) if overrides_file.is_file() else []
    grids = sorted((run / "samples").glob("step_*.png"))
    score = newest_eval(run)
    fid = kid = floor = None
    if score and score.get("features"):
        features = score["features"].get("classifier") or next(iter(score["features"].values()))
        fid, kid, floor = features.get("fid"), features.get("kid"), features.get("fid_floor")
    losses = [r for r in rows if "loss" in r]  # the rows of a run's own scores have none
    last = losses[-1] if losses else {}
    speeds = [r["img_per_s"] for r in rows if r.get("img_per_s")]
    return RunRow(
        run=str(run.relative_to(folder)) if run != folder else ".",
        overrides=" ".join(o for o in overrides if not o.startswith(("hydra.", "resume="))),
        data=(config.get("data") or {}).get("name", "?"),
        steps=last.get("step", 0),
        final_loss=last.get("loss"),
        img_per_s=statistics.median(speeds) if speeds else None,
        fid=fid,
        kid=kid,
        fid_floor=floor,
        class_accuracy=score.get("class_accuracy") if score else None,
        bpd=score["nll"]["bpd"] if score and "nll" in score else None,
        wall_s=last.get("elapsed_s"),
        grid=str(grids[-1].relative_to(folder)) if grids else "",
    )


def summarise(folder: Path) -> tuple[list[RunRow], list[str]]:
    """The rows, best FID first (runs without one after, in folder order), and notes about comparability."""
    runs = find_runs(folder)
    if not runs:
        raise ConfigError(f"{folder} holds no runs (no metrics.jsonl under it): give a sweep folder or a run")
    rows = [run_row(r, folder) for r in runs]
    if len(rows) > 1:  # label each run by what sets it apart: the overrides every run shares go
        shared = set.intersection(*(set(r.overrides.split()) for r in rows))
        for r in rows:
            r.overrides = " ".join(o for o in r.overrides.split() if o not in shared)
    rows.sort(key=lambda r: (r.fid is None, r.fid if r.fid is not None else 0.0))
    notes = []
    data_sets = sorted({r.data for r in rows})
    if len(data_sets) > 1:
        notes.append(
            f"the runs are of different data sets ({', '.join(data_sets)}): their FID and KID are against "
            "different real images and cannot be compared"
        )
    if any(r.fid is None for r in rows):
        notes.append(
            "runs without eval.json have no FID (score one with ddpm-eval ckpt=<run>/checkpoints/last.pt)"
        )
    return rows, notes


def cell(value: object) -> str:
    """A table cell: blank for None, four significant digits for a float."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def write_summary(folder: Path) -> list[str]:
    """summary.csv, summary.md and summary.png in ``folder``; returns the notes (also in summary.md)."""
    rows, notes = summarise(folder)
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=FIELDS)
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    write_atomically(folder / "summary.csv", lambda f: f.write(table.getvalue().encode()))
    lines = ["| " + " | ".join(FIELDS) + " |", "|" + " --- |" * len(FIELDS)]
    lines += ["| " + " | ".join(cell(getattr(r, k)) for k in FIELDS) + " |" for r in rows]
    text = "\n".join([f"# {folder}", "", *lines, "", *(f"- {n}" for n in notes)]) + "\n"
    write_atomically(folder / "summary.md", lambda f: f.write(text.encode()))
    save_summary_plot(folder, rows)
    return notes


def label(row: RunRow, width: int) -> str:
    """What sets the run apart, cut to ``width`` characters (a lone run's label is all its overrides)."""
    return textwrap.shorten(row.overrides or row.run, width, placeholder=" ...")


def save_summary_plot(folder: Path, rows: list[RunRow]) -> None:
    """summary.png: every run's smoothed loss on one plot, and each run's newest grid beside it."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from PIL import Image

    grids = [r for r in rows if r.grid]
    fig = plt.figure(figsize=(5 + 2.2 * len(grids), 4), layout="constrained")
    axes = fig.subplots(1, 1 + len(grids), width_ratios=[2.2] + [1] * len(grids), squeeze=False)[0]
    for r in rows:
        metrics = read_metrics(folder / r.run / "metrics.jsonl")
        steps, losses = (
            [m["step"] for m in metrics],
            [m["loss"] for m in metrics if m.get("loss") is not None],
        )
        axes[0].plot(steps[: len(losses)], smoothed(losses), lw=1.5, label=label(r, 60))
    axes[0].set(xlabel="step", ylabel="loss (smoothed)", yscale="log")
    axes[0].legend(fontsize=7)
    for ax, r in zip(axes[1:], grids, strict=True):
        ax.imshow(Image.open(folder / r.grid), cmap="gray")
        floor = f" (real {cell(r.fid_floor)})" if r.fid_floor is not None else ""
        ax.set_title(f"{textwrap.fill(label(r, 90), 30)}\nFID {cell(r.fid) or 'n/a'}{floor}", fontsize=7)
        ax.axis("off")
    write_atomically(folder / "summary.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
