"""scripts/quality_digits.py end to end at the tiniest budget: every setting and seed trains, samples and
is scored in both feature spaces, and the report holds the medians, the floor and the verdicts; for the
class-conditional comparison, also each conditional row's class accuracy and the ceiling."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_digits.py"


def run_script(tmp_path: Path, args: list[str], timeout: float) -> tuple[subprocess.CompletedProcess, dict]:
    """The script with ``args``, at two seeds and 150 samples, with a cheap classifier cached in tmp_path;
    its completed process and quality.json."""
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        *args,
        *("--seeds", "0,1", "--n", "150", "--out", str(out)),
        *("--eval-overrides", "classifier_steps=20", f"classifier_cache={tmp_path}", "kid_subsets=2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads((out / "quality.json").read_text())


def test_quality_digits_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("denoising_diffusion_pytorch")  # the bench extra
    args = [
        *("--ours", "default", "lr=2e-3"),
        *("--ours-minutes", "0.005", "--ours-overrides", "sample_steps=5", "lr_decay=none"),
        *("--reference", "mults=1-2", "--reference-minutes", "0.005", "--reference-sampling-steps", "5,10"),
    ]
    result, report = run_script(tmp_path, args, timeout=300)
    out = tmp_path / "out"
    assert len(report["runs"]) == 2 * (2 + 2)  # seeds x (ddpm settings + reference sampling steps)
    assert {r["seed"] for r in report["runs"]} == {0, 1}
    assert [e["run"] for e in report["summary"]] == [
        "ddpm default",
        "ddpm lr=2e-3",
        "lucidrains dim 32, mults 1-2, lr 0.001, ddim, 5 steps",
        "lucidrains dim 32, mults 1-2, lr 0.001, ddim, 10 steps",
    ]
    for entry in report["summary"]:
        for space in ("classifier", "pixels"):
            fid = entry[space]["fid"]
            assert fid["min"] <= fid["median"] <= fid["max"]
    assert set(report["floor"]) == {"classifier", "pixels"}
    assert (
        len(report["verdicts"]) == 3
    )  # each ddpm setting against the reference, the second against the first
    assert (out / "quality.md").read_text().startswith("| run |")
    assert "beats every reference row" in result.stdout


def test_quality_digits_conditional(tmp_path: Path) -> None:
    """ddpm's class_cond=true at two guidance scales beside its unconditional default, and the reference's
    classifier_free_guidance at two cond_scales (1 raises inside 2.3.4's sampler: a failed row, not a
    crash), with small U-Nets so that the whole comparison stays cheap."""
    pytest.importorskip("denoising_diffusion_pytorch.classifier_free_guidance")  # the bench extra
    args = [
        *("--ours", "default", "class_cond=true", "--guidance", "1,2", "--ours-minutes", "0.005"),
        *("--ours-overrides", "sample_steps=5", "lr_decay=none", "model.dim=8", "model.dim_mults=[1,2]"),
        "--reference",
        *("--reference-cfg", "dim=8,mults=1-2", "--reference-cfg-minutes", "0.005"),
        *("--reference-cfg-sampling-steps", "5", "--reference-cond-scales", "2,1"),
    ]
    _, report = run_script(tmp_path, args, timeout=600)
    out = tmp_path / "out"
    assert len(report["runs"]) == 2 * (1 + 2 + 2)  # seeds x (default + guidance scales + cond_scales)
    reference = "lucidrains cfg dim 8, mults 1-2, lr 0.001, ddim, 5 steps"
    assert [e["run"] for e in report["summary"]] == [
        "ddpm default",
        "ddpm class_cond=true, guidance 1",
        "ddpm class_cond=true, guidance 2",
        f"{reference}, cond_scale 2",
        f"{reference}, cond_scale 1",
    ]
    for row in report["runs"]:
        if not row["conditional"]:
            assert "class_accuracy" not in row and row["scores"] is not None
        elif row["scores"] is None:  # the reference's sampler raised at this scale
            assert row.get("cond_scale") == 1 and row["class_accuracy"] is None and row["error"]
        else:
            assert 0 <= row["class_accuracy"] <= 1
            assert set(row["class_accuracy_per_class"]) == {str(i) for i in range(10)}
    for entry in report["summary"]:
        assert ("class_accuracy" in entry) == entry["conditional"]
        if entry["run"].endswith("cond_scale 1") and "failed" in entry:
            assert entry["class_accuracy"]["median"] is None and entry["classifier"]["fid"]["median"] is None
        elif entry["conditional"]:
            accuracy = entry["class_accuracy"]
            assert 0 <= accuracy["min"] <= accuracy["median"] <= accuracy["max"] <= 1
    assert 0 < report["protocol"]["real_class_accuracy"] <= 1
    verdicts = report["verdicts"]
    assert len(verdicts) == 2 + 2  # the conditional ddpm rows' two lines each (no unconditional reference)
    assert not any("beats every reference row" in v for v in verdicts)
    conditional = [v for v in verdicts if "beats every conditional reference row" in v]
    assert len(conditional) == 2 and all("class accuracy: " in v for v in conditional)
    against = [v for v in verdicts if " against ddpm default, 0.005 min (medians)" in v]
    assert len(against) == 2 and all(
        "reaches class accuracy >= 0.98 at an FID no worse" in v for v in against
    )
    markdown = (out / "quality.md").read_text()
    assert "| class accuracy |" in markdown.splitlines()[0] and "(the ceiling)" in markdown


def test_quality_digits_variances_and_bounds(tmp_path: Path) -> None:
    """--variances x --sample-steps rows of a fixed-variance and a learn_sigma setting (each at the
    variances of its kind), --bpd bounds of each, and the learned-against-fixed verdicts; no reference, so
    this one runs without the bench extra."""
    args = [
        *("--ours", "default", "learn_sigma=true", "--ours-minutes", "0.005", "--reference"),
        *("--ours-overrides", "timesteps=20", "lr_decay=none", "model.dim=8", "model.dim_mults=[1,2]"),
        *("--variances", "small,large,learned", "--sample-steps", "5,all", "--bpd", "30"),
    ]
    result, report = run_script(tmp_path, args, timeout=300)
    assert [e["run"] for e in report["summary"]] == [
        "ddpm default, small variance, 5 steps",
        "ddpm default, small variance, 20 steps",
        "ddpm default, large variance, 5 steps",
        "ddpm default, large variance, 20 steps",
        "ddpm learn_sigma=true, learned variance, 5 steps",
        "ddpm learn_sigma=true, learned variance, 20 steps",
    ]
    assert [(e["variance"], e["sample_steps"]) for e in report["summary"]][-2:] == [
        ("learned", 5),
        ("learned", 20),
    ]
    bounds = report["bounds_summary"]
    assert [(e["run"], e["variance"]) for e in bounds] == [
        ("ddpm default", "small"),
        ("ddpm default", "large"),
        ("ddpm learn_sigma=true", "learned"),
    ]
    for e in bounds:
        assert e["n"] == 30 and e["seeds"] == [0, 1]
        assert 0 < e["bpd"]["min"] <= e["bpd"]["median"] <= e["bpd"]["max"]
        assert 0 < e["prior_bpd"] < e["bpd"]["median"]
    by_seed = {(r["run"], r["variance"], r["seed"]): r for r in report["bounds"]}
    assert all(r["T"] == 20 and r["split"] == "train" for r in by_seed.values())
    verdicts = report["verdicts"]
    assert sum("beats every fixed-variance row at" in v for v in verdicts) == 2  # one per step count
    [lowers] = [v for v in verdicts if "lowers bits/dim below the better fixed variance" in v]
    better = min(bounds[:2], key=lambda e: e["bpd"]["median"])
    assert f"of ddpm default, {better['variance']} variance" in lowers
    assert "| variance | bits/dim |" in (tmp_path / "out" / "quality.md").read_text()
    assert "bits/dim on 30 digits" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ours", "default", "--variances", "learned"], "names no variance of 'default'"),
        (["--variances", "wide"], "'wide' is not a variance; choose from auto, small, large, learned"),
        (["--sample-steps", "0"], "'0' is neither a step count >= 1 nor all"),
        (["--bpd", "-1"], "--bpd must be >= 0"),
    ],
)
def test_quality_digits_refuses(tmp_path: Path, args: list[str], message: str) -> None:
    """Bad --variances, --sample-steps and --bpd fail in one line before any training."""
    command = [sys.executable, str(SCRIPT), "--reference", *args, "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and message in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
