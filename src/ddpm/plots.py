"""Figures of a run's metrics: loss.png (raw and smoothed loss, learning rate, loss by timestep quartile)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ddpm.files import write_atomically

# The smoothed curve is a debiased exponential moving average of the logged rows, as TensorBoard's, whose
# window (1 / (1 - weight) rows) spans at most WINDOW of them: a short run's few rows, each already a mean
# over log_every steps, are drawn as they are, where a fixed 0.9 would lag a falling loss by ten rows.
SMOOTHING = 0.9  # the most weight, for long runs
WINDOW = 0.05


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line cut short by a killed run is left out."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def smoothing_weight(n: int) -> float:
    """The EMA weight for ``n`` logged rows: a window of WINDOW * n rows, at most SMOOTHING's."""
    return min(SMOOTHING, max(0.0, 1 - 1 / max(1.0, WINDOW * n)))


def smoothed(values: list[float], weight: float | None = None) -> list[float]:
    """Exponential moving average with bias correction, so the first points are not pulled to zero;
    ``weight`` None: ``smoothing_weight`` of the number of values."""
    weight = smoothing_weight(len(values)) if weight is None else weight
    if weight == 0:
        return list(values)
    out, average = [], 0.0
    for i, v in enumerate(values, start=1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight**i))
    return out


def draw_lr(axis: Any, steps: list[int], lrs: list[float | None]) -> None:
    """The learning rate on its own axis, from 0: a constant rate is one flat line, not a wobble on
    ticks 4% apart (matplotlib's autoscale of a flat line)."""
    axis.plot(steps, lrs, color="tab:orange", lw=1, label="lr")
    axis.set_ylabel("learning rate", color="tab:orange")
    top = max((v for v in lrs if v is not None), default=0.0)
    if top > 0:
        axis.set_ylim(0, 1.1 * top)


def save_loss_plot(metrics: Path, path: Path, title: str = "") -> None:
    """loss.png: the loss per logged interval and its smoothed curve (log scale), the learning rate on a
    second axis, the loss by timestep quartile when the rows have it, and the run's own FID scores and
    likelihood bounds (eval_every, eval.nll) when it has any."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none looked for
    from matplotlib import pyplot as plt

    every = read_metrics(metrics)
    rows = [r for r in every if r.get("loss") is not None]
    scores = {k for r in every for k in r if k.startswith("fid_")}
    bounds = [(r["step"], r["bpd"]) for r in every if r.get("bpd") is not None]
    panels = 2 + bool(scores) + bool(bounds)
    fig, axes = plt.subplots(1, panels, figsize=(2 + 4 * panels, 3.6), layout="constrained", dpi=80)
    ax, aq = axes[:2]
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    weight = smoothing_weight(len(losses))
    if weight > 0:
        ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=1, label="loss")
        ax.plot(steps, smoothed(losses), color="tab:blue", lw=2, label=f"smoothed (EMA {weight:.2g})")
    else:  # too few rows to smooth: each is already a mean over log_every steps
        ax.plot(steps, losses, color="tab:blue", lw=2, label="loss")
    ax.set(xlabel="step", ylabel="loss", yscale="log" if losses and min(losses) > 0 else "linear")
    draw_lr(ax.twinx(), steps, [r.get("lr") for r in rows])
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title or str(metrics.parent), fontsize=9)
    for q in range(4):
        points = [(r["step"], r[f"loss_q{q}"]) for r in rows if r.get(f"loss_q{q}") is not None]
        if points:
            aq.plot(*zip(*points, strict=True), lw=1, label=f"t in quarter {q + 1} of [0, T)")
    aq.set(xlabel="step", ylabel="loss by timestep")
    if aq.lines:
        aq.set_yscale("log")
        aq.legend(fontsize=8)
    for key in sorted(scores):
        points = [(r["step"], r[key]) for r in every if r.get(key) is not None]
        label = key.replace("_", " ")
        if key.startswith("fid_floor_"):  # what real images score: the line to aim for
            axes[2].axhline(points[-1][1], ls="--", lw=1, color="gray", label=label)
        elif points:
            axes[2].plot(*zip(*points, strict=True), lw=1, marker="o", label=label)
    if scores:
        axes[2].set(xlabel="step", ylabel="FID (lower is better)", ylim=(0, None))
        axes[2].legend(fontsize=8)
    if bounds:  # eval.nll: the likelihood bound of the same real images at each score
        axes[-1].plot(*zip(*bounds, strict=True), lw=1, marker="o", color="tab:green", label="bound")
        axes[-1].set(xlabel="step", ylabel="NLL bound, bits/dim (lower is better)")
        axes[-1].legend(fontsize=8)
    write_atomically(path, lambda f: fig.savefig(f, format="png"))
    plt.close(fig)
