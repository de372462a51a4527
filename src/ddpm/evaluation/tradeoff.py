"""The answer of a ``ddpm-eval -m`` sweep: one row per job's eval.json, as sweep.csv and sweep.md, and for
a class-conditional model swept over ``guidance_scale`` the FID-against-class-accuracy trade-off as
guidance.png (Ho & Salimans 2021, fig. 4: fidelity rises with the scale, diversity falls)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ddpm.files import write_atomically
from ddpm.summary import cell


def sweep_rows(reports: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[str]]:
    """A row per report, by guidance scale where the jobs have one; and the feature spaces scored. With
    nll=true the row has the bound in bits/dim too."""
    spaces = sorted({name for r in reports for name in r.get("features", {})}, key=_space_order)
    bounds = any("nll" in r for r in reports)
    rows = []
    for r in reports:
        source = r.get("source", {})
        row: dict[str, Any] = {
            "ckpt": source.get("ckpt", source.get("samples", "")),
            "guidance_scale": source.get("guidance_scale"),
            "sampler": source.get("sampler"),
            "sample_steps": source.get("sample_steps"),
            "class_accuracy": r.get("class_accuracy"),
            "class_accuracy_real": r.get("class_accuracy_real"),
        }
        for name in spaces:
            result = r.get("features", {}).get(name, {})
            row[f"fid_{name}"], row[f"fid_floor_{name}"] = result.get("fid"), result.get("fid_floor")
        if bounds:  # nll=true: the bound, and the variance it was computed with
            nll = r.get("nll", {})
            row["bpd"], row["bpd_se"], row["variance"] = (
                nll.get("bpd"),
                nll.get("bpd_se"),
                nll.get("variance"),
            )
        row["out"] = r.get("out", "")
        rows.append(row)
    rows.sort(key=lambda row: (str(row["ckpt"]), row["guidance_scale"] is None, row["guidance_scale"] or 0))
    return rows, spaces


def _space_order(name: str) -> tuple[int, str]:
    return ({"classifier": 0, "inception": 1, "pixels": 2}.get(name, 3), name)


def write_sweep(folder: Path, reports: Sequence[dict[str, Any]]) -> list[Path]:
    """sweep.csv and sweep.md in ``folder`` and, where the jobs report class accuracy at more than one
    guidance scale, guidance.png; returns the files written."""
    rows, spaces = sweep_rows(reports)
    fields = list(rows[0])
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(folder / "sweep.csv", lambda f: f.write(table.getvalue().encode()))
    lines = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    lines += ["| " + " | ".join(cell(row[k]) for k in fields) + " |" for row in rows]
    write_atomically(folder / "sweep.md", lambda f: f.write(("\n".join(lines) + "\n").encode()))
    written = [folder / "sweep.csv", folder / "sweep.md"]
    guided = [r for r in rows if r["class_accuracy"] is not None and r["guidance_scale"] is not None]
    if len({r["guidance_scale"] for r in guided}) > 1:
        save_tradeoff_plot(folder / "guidance.png", guided, spaces)
        written.append(folder / "guidance.png")
    return written


def save_tradeoff_plot(path: Path, rows: list[dict[str, Any]], spaces: list[str]) -> None:
    """guidance.png: FID (each feature space, with its real-vs-real floor) against class accuracy, one
    point per guidance scale, and the real images' accuracy as the ceiling."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    shown = [s for s in spaces if any(r[f"fid_{s}"] is not None for r in rows)]
    fig = plt.figure(figsize=(4.2 * max(1, len(shown)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(shown)), squeeze=False)[0]
    for ax, space in zip(axes, shown, strict=False):
        for ckpt in sorted({str(r["ckpt"]) for r in rows}):
            own = [r for r in rows if str(r["ckpt"]) == ckpt and r[f"fid_{space}"] is not None]
            xs, ys = [r["class_accuracy"] for r in own], [r[f"fid_{space}"] for r in own]
            ax.plot(xs, ys, "o-", label=Path(ckpt).name if len(rows) != len(own) else None)
            for r, x, y in zip(own, xs, ys, strict=True):
                ax.annotate(
                    f"s={r['guidance_scale']:g}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                )
        floors = [r[f"fid_floor_{space}"] for r in rows if r[f"fid_floor_{space}"] is not None]
        if floors:
            ax.axhline(min(floors), color="grey", ls="--", lw=1, label="real vs real")
        ceilings = [r["class_accuracy_real"] for r in rows if r["class_accuracy_real"] is not None]
        if ceilings:
            ax.axvline(max(ceilings), color="grey", ls=":", lw=1, label="real images' accuracy")
        ax.set(xlabel="class accuracy", ylabel=f"FID ({space} features)", yscale="log")
        ax.legend(fontsize=7)
    write_atomically(path, lambda f: fig.savefig(f, format="png", dpi=110))
    plt.close(fig)
