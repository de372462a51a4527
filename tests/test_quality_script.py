"""scripts/quality_digits.py end to end at the tiniest budget: every setting and seed trains, samples and
is scored in both feature spaces, and the report holds the medians, the floor and the verdicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_digits.py"


def test_quality_digits_end_to_end(tmp_path: Path) -> None:
    pytest.importorskip("denoising_diffusion_pytorch")  # the bench extra
    out = tmp_path / "out"
    command = [
        sys.executable,
        str(SCRIPT),
        *("--ours", "default", "lr=2e-3"),
        *("--ours-minutes", "0.005", "--ours-overrides", "sample_steps=5"),
        *("--reference", "mults=1-2", "--reference-minutes", "0.005", "--reference-sampling-steps", "5,10"),
        *("--seeds", "0,1", "--n", "150", "--out", str(out)),
        *("--eval-overrides", "classifier_steps=20", f"classifier_cache={tmp_path}", "kid_subsets=2"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((out / "quality.json").read_text())
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
