"""scripts/sampling_quality.py at the tiniest size: one checkpoint, two sampler settings and two seeds,
every seed scored against the same reals; and its one-line refusals."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import FIXTURES

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sampling_quality.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_sampling_quality_scores_each_setting_over_the_seeds(tmp_path: Path) -> None:
    out = tmp_path / "table.md"
    cheap = ["classifier_steps=20", f"classifier_cache={tmp_path}", "kid_subsets=2", "kid_subset_size=50"]
    result = run(
        str(FIXTURES / "tiny_v2.pt"),
        *("--n", "150", "--n-real", "200", "--seeds", "0", "1", "--settings", "ddpm:3", "ddim:2"),
        *("--out", str(out), "--scoring-overrides", *cheap),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(tmp_path.glob("ddpm_classifier_*.pt"))  # the cache it was told, not the home folder
    text = out.read_text()
    assert "150 samples per setting, seeds [0, 1]" in text and "against the same 200" in text
    rows = [line for line in text.splitlines() if line.startswith("| ddpm |") or line.startswith("| ddim |")]
    cells = [row.strip("| ").split(" | ") for row in rows]
    assert [c[1] for c in cells] == ["3", "2"]
    for row in cells:  # FID in classifier features and in pixels: median (min-max) over the seeds
        for cell in (row[3], row[5]):
            median, spread = cell.split(" (")
            low, high = (float(v) for v in spread.rstrip(")").split("-"))
            assert low <= float(median) <= high and low > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--settings", "heun:10"], "'heun:10' is not sampler:steps with a sampler of ddpm, ddim"),
        (["--settings", "ddpm:0"], "'ddpm:0' is not sampler:steps"),
        (["--settings", "ddpm"], "'ddpm' is not sampler:steps"),
    ],
)
def test_sampling_quality_refuses_a_bad_setting(args: list[str], message: str) -> None:
    result = run(str(FIXTURES / "tiny_v2.pt"), *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_sampling_quality_refuses_a_missing_checkpoint(tmp_path: Path) -> None:
    result = run(str(tmp_path / "nope.pt"))
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "nope.pt" in lines[0], result.stderr[-2000:]
