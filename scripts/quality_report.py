"""quality_digits.py's report: the medians and ranges over seeds of every run's scores and of every bound,
their Markdown tables, and the verdicts the targets ask for (beats ... by more than the spread, within noise,
a conditional row against the unconditional one, a learned variance against the fixed ones)."""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

SPACES = ("classifier", "pixels")  # the feature spaces every run is scored in
ACCURACY_TARGET = 0.98  # the class accuracy a conditional ddpm row should reach


# ----------------------------------------------------------------------------------------------- summary
def ceiling_text(real_accuracy: float | None) -> str:
    """The real digits' class accuracy, the most a conditional model's can be expected to reach."""
    return f"class accuracy of the real digits (the ceiling) {real_accuracy:.3f}" if real_accuracy else ""


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (run, minutes): medians over the seeds and the range of each FID (and of the class
    accuracy of a conditional run), over the seeds that did not fail."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["minutes"]), []).append(row)
    summary = []
    for (run, minutes), group in groups.items():
        scored = [r for r in group if r["scores"] is not None]
        entry: dict[str, Any] = {
            "run": run,
            "impl": group[0]["impl"],
            "conditional": group[0]["conditional"],
            "minutes": minutes,
            "seeds": [r["seed"] for r in group],
            "steps": statistics.median(r["steps"] for r in group),
            "sample_s": statistics.median(r["sample_s"] for r in group),
            "sampler": group[0]["sampler"],
        }
        for key in ("guidance_scale", "cond_scale", "variance", "sample_steps"):
            if key in group[0]:
                entry[key] = group[0][key]
        for space in SPACES:
            entry[space] = {
                "fid": spread([r["scores"][space]["fid"] for r in scored]),
                "precision": median([r["scores"][space]["precision"] for r in scored]),
                "recall": median([r["scores"][space]["recall"] for r in scored]),
            }
        if entry["conditional"]:
            entry["class_accuracy"] = spread([r["class_accuracy"] for r in group])
        failed = [r for r in group if r.get("error")]
        if failed:
            entry["failed"] = {
                "seeds": [r["seed"] for r in failed],
                "errors": sorted({r["error"] for r in failed}),
            }
        summary.append(entry)
    return summary


def spread_text(s: dict[str, float | None], seeds: int) -> str:
    if s["median"] is None:
        return "n/a"
    if seeds == 1:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def sampling_text(e: dict) -> str:
    text = f"{e['sample_s']:.0f} s ({e['sampler']})"
    if "failed" in e:
        seeds = ", ".join(map(str, e["failed"]["seeds"]))
        text += f"; failed at seed {seeds}: {'; '.join(e['failed']['errors'])}"
    return text


def table(
    summary: list[dict], floor: dict | None, n: int, n_real: int, real_accuracy: float | None
) -> list[str]:
    lines = [
        "| run | training | steps (median) | FID classifier | FID pixels | class accuracy "
        f"| precision / recall (classifier) | sampling {n:,} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        c, p = e["classifier"], e["pixels"]
        k = len(e["seeds"])
        accuracy = spread_text(e["class_accuracy"], k) if e["conditional"] else ""
        pr = "n/a" if c["precision"] is None else f"{c['precision']:.3f} / {c['recall']:.3f}"
        lines.append(
            f"| {e['run']} | {e['minutes']:g} min | {e['steps']:,.0f} | {spread_text(c['fid'], k)} | "
            f"{spread_text(p['fid'], k)} | {accuracy} | {pr} | {sampling_text(e)} |"
        )
    conditional = any(e["conditional"] for e in summary)
    if floor is not None:
        fids = ", ".join(
            f"{space} {floor[space]['fid']:.3f}" if floor[space]["fid"] is not None else f"{space} n/a"
            for space in SPACES
        )
        ceiling = f"; {ceiling_text(real_accuracy)}" if conditional and real_accuracy else ""
        lines.append("")
        lines.append(
            f"Real vs real ({n:,} other real digits against the same {n_real:,}): FID {fids}{ceiling}."
        )
    elif conditional and real_accuracy:
        lines += ["", f"The {n_real:,} real digits' {ceiling_text(real_accuracy)}."]
    return lines


# ---------------------------------------------------------------------------------------------- verdicts
def seeds_text(e: dict) -> str:
    return f"{len(e['seeds'])} seed{'s' if len(e['seeds']) > 1 else ''}"


def fid_beats(e: dict, refs: list[dict], space: str) -> str:
    """Is e's worst FID in ``space`` below every reference row's best? It is set against the reference row
    whose best seed scores lowest."""
    mine = e[space]["fid"]
    known = [r for r in refs if r[space]["fid"]["min"] is not None]
    if mine["max"] is None or not known:
        return f"{space}: n/a"
    best = min(known, key=lambda r: r[space]["fid"]["min"])
    theirs = best[space]["fid"]
    beats = mine["max"] < theirs["min"]
    return (
        f"{space}: {'yes' if beats else 'no'} (max {mine['max']:.3f} vs min {theirs['min']:.3f} of "
        f"{best['run']}, {best['minutes']:g} min)"
    )


def accuracy_beats(e: dict, refs: list[dict]) -> str:
    """Is e's worst class accuracy above every conditional reference row's best?"""
    mine = e["class_accuracy"]
    known = [r for r in refs if r["class_accuracy"]["max"] is not None]
    if mine["min"] is None or not known:
        return "class accuracy: n/a"
    best = max(known, key=lambda r: r["class_accuracy"]["max"])
    theirs = best["class_accuracy"]
    beats = mine["min"] > theirs["max"]
    return (
        f"class accuracy: {'yes' if beats else 'no'} (min {mine['min']:.3f} vs max {theirs['max']:.3f} of "
        f"{best['run']}, {best['minutes']:g} min)"
    )


def within_noise(e: dict, base: dict) -> str:
    """Do the FID ranges of two ddpm settings at one budget overlap?"""
    parts = []
    for space in SPACES:
        a, b = e[space]["fid"], base[space]["fid"]
        if a["max"] is None or b["max"] is None:
            parts.append(f"{space}: n/a")
            continue
        overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
        parts.append(
            f"{space}: {'within noise' if overlap else 'apart'} ([{a['min']:.3f}, {a['max']:.3f}] vs "
            f"[{b['min']:.3f}, {b['max']:.3f}])"
        )
    return f"{e['run']} against {base['run']}, {e['minutes']:g} min: " + "; ".join(parts)


def against_unconditional(e: dict, base: dict) -> str:
    """Does a conditional ddpm row reach ACCURACY_TARGET at median FIDs no worse than an unconditional ddpm
    row's at the same budget?"""
    accuracy = e["class_accuracy"]["median"]
    reached = accuracy is not None and accuracy >= ACCURACY_TARGET
    parts = [
        f"class accuracy {'n/a' if accuracy is None else f'{accuracy:.3f}'} >= {ACCURACY_TARGET:g}: "
        f"{'yes' if reached else 'no'}"
    ]
    no_worse = True
    for space in SPACES:
        a, b = e[space]["fid"]["median"], base[space]["fid"]["median"]
        if a is None or b is None:
            parts.append(f"FID {space} no worse: n/a")
            no_worse = False
            continue
        no_worse &= a <= b
        parts.append(f"FID {space} {a:.3f} <= {b:.3f}: {'yes' if a <= b else 'no'}")
    both = "yes" if reached and no_worse else "no"
    return (
        f"{e['run']} against {base['run']}, {e['minutes']:g} min (medians): reaches class accuracy "
        f">= {ACCURACY_TARGET:g} at an FID no worse: {both} (" + "; ".join(parts) + ")"
    )


def sampler_of(e: dict) -> tuple[Any, Any]:
    """The --variances / --sample-steps row an entry is (None, None: the setting's own sampler)."""
    return e.get("variance"), e.get("sample_steps")


def learned_against_fixed(e: dict, fixed: list[dict]) -> str:
    """Does a learned-variance row beat every fixed-variance row at its step count by more than the spread?"""
    return (
        f"{e['run']}, {e['minutes']:g} min ({seeds_text(e)}) beats every fixed-variance row at "
        f"{e['sample_steps']} steps by more than the spread: "
        + "; ".join(fid_beats(e, fixed, space) for space in SPACES)
    )


def verdicts(summary: list[dict]) -> list[str]:
    """Per ddpm row, where there are reference rows: does it beat every unconditional reference row (each
    U-Net, budget and sampling steps) by more than the spread over seeds, in each feature space? Per
    conditional ddpm row, the same against the conditional reference rows, in class accuracy too. Each
    further unconditional ddpm setting against the first with the same sampler at the same budget: do their
    ranges overlap (within noise)? Each learned-variance row against the fixed-variance rows at its step
    count. And each conditional ddpm row against each unconditional one at its budget: class accuracy >=
    ACCURACY_TARGET at an FID no worse?"""
    ours = [e for e in summary if e["impl"] == "ddpm"]
    plain = [e for e in ours if not e["conditional"]]
    guided = [e for e in ours if e["conditional"]]
    refs = [e for e in summary if e["impl"] == "lucidrains" and not e["conditional"]]
    cfg_refs = [e for e in summary if e["impl"] == "lucidrains" and e["conditional"]]
    lines = [
        f"{e['run']}, {e['minutes']:g} min ({seeds_text(e)}) beats every reference row by more than the "
        "spread: " + "; ".join(fid_beats(e, refs, space) for space in SPACES)
        for e in ours
        if refs
    ]
    for e in guided:
        parts = [accuracy_beats(e, cfg_refs), *(fid_beats(e, cfg_refs, space) for space in SPACES)]
        lines.append(
            f"{e['run']}, {e['minutes']:g} min ({seeds_text(e)}) beats every conditional reference row by "
            "more than the spread: " + "; ".join(parts)
        )
    for e in plain:
        base = next(b for b in plain if b["minutes"] == e["minutes"] and sampler_of(b) == sampler_of(e))
        if base is not e:
            lines.append(within_noise(e, base))
    for e in plain:
        if e.get("variance") != "learned":
            continue
        fixed = [
            f
            for f in plain
            if f.get("variance") in ("small", "large")
            and (f["minutes"], f["sample_steps"]) == (e["minutes"], e["sample_steps"])
        ]
        if fixed:
            lines.append(learned_against_fixed(e, fixed))
    for e in guided:
        lines += [against_unconditional(e, base) for base in plain if base["minutes"] == e["minutes"]]
    return lines


# ------------------------------------------------------------------------------------------------ bounds
def summarise_bounds(bounds: list[dict]) -> list[dict]:
    """One entry per (run, minutes, variance): the median and range of bits/dim over the seeds, and the
    medians of its standard error, its prior and decoder terms and its seconds."""
    groups: dict[tuple[str, float, str], list[dict]] = {}
    for row in bounds:
        groups.setdefault((row["run"], row["minutes"], row["variance"]), []).append(row)
    return [
        {
            "run": run,
            "minutes": minutes,
            "variance": variance,
            "seeds": [r["seed"] for r in group],
            "n": group[0]["n"],
            "bpd": spread([r["bpd"] for r in group]),
            **{key: median([r[key] for r in group]) for key in ("bpd_se", "prior_bpd", "decoder_bpd")},
            "seconds": median([r["seconds"] for r in group]),
        }
        for (run, minutes, variance), group in groups.items()
    ]


def bound_table(entries: list[dict]) -> list[str]:
    if not entries:
        return []
    lines = [
        "| run | training | variance | bits/dim | standard error (median) | prior / decoder (median) | "
        "seconds |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in entries:
        se = "n/a" if e["bpd_se"] is None else f"{e['bpd_se']:.3f}"
        lines.append(
            f"| {e['run']} | {e['minutes']:g} min | {e['variance']} | "
            f"{spread_text(e['bpd'], len(e['seeds']))} | {se} | "
            f"{e['prior_bpd']:.3f} / {e['decoder_bpd']:.3f} | {e['seconds']:.0f} |"
        )
    lines += ["", f"Bits/dim on {entries[0]['n']:,} of the training digits, over all T steps."]
    return lines


def bound_verdicts(entries: list[dict]) -> list[str]:
    """Each learned-variance bound against the better fixed-variance bound (the lower median) at its
    budget: is its worst seed below that one's best?"""
    lines = []
    for e in entries:
        fixed = [f for f in entries if f["variance"] != "learned" and f["minutes"] == e["minutes"]]
        if e["variance"] != "learned" or not fixed:
            continue
        better = min(fixed, key=lambda f: f["bpd"]["median"])
        mine, theirs = e["bpd"], better["bpd"]
        lower = mine["max"] < theirs["min"]
        lines.append(
            f"{e['run']}, {e['minutes']:g} min ({seeds_text(e)}) lowers bits/dim below the better fixed "
            f"variance by more than the spread: {'yes' if lower else 'no'} (max {mine['max']:.3f} vs min "
            f"{theirs['min']:.3f} of {better['run']}, {better['variance']} variance; medians "
            f"{mine['median']:.3f} vs {theirs['median']:.3f})"
        )
    return lines


# ------------------------------------------------------------------------------------------------ report
def write_report(
    out: Path,
    args: argparse.Namespace,
    protocol: dict,
    floor: dict | None,
    rows: list[dict],
    bounds: list[dict],
) -> dict:
    """<out>/quality.json (every run, the summary, the table and the verdicts) and <out>/quality.md."""
    summary = summarise(rows)
    lines = table(summary, floor, args.n, protocol["n_real"], protocol["real_class_accuracy"])
    bound_summary = summarise_bounds(bounds)
    bound_lines = bound_table(bound_summary)
    verdict = verdicts(summary) + bound_verdicts(bound_summary)
    report = {
        "command": " ".join(sys.argv),
        "protocol": protocol,
        "floor": floor,
        "summary": summary,
        "table": lines,
        "bounds_summary": bound_summary,
        "bounds_table": bound_lines,
        "verdicts": verdict,
        "runs": rows,
        "bounds": bounds,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    bound_part = [*bound_lines, ""] if bound_lines else []
    (out / "quality.md").write_text("\n".join([*lines, "", *bound_part, *verdict]) + "\n")
    return report
