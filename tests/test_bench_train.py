"""scripts/bench_train.py: each lever combination is built, timed and named in its row; bad lever values
fail in one line before any timing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_train.py"


def bench(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--shape", "digits8", "--impl", "ddpm", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_one_row_per_lever_combination() -> None:
    result = bench(
        *("--precision", "fp32", "--dim", "8,16", "--channels-last", "false,true"),
        *("--compile", "false", "--steps", "1", "--repeats", "1", "--warmup", "1"),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if "ms/step" in line]
    described = [row.split(" | ")[1] for row in rows]
    assert described == [
        "fp32, eager, dim 8",
        "fp32, eager, dim 8, channels-last",
        "fp32, eager, dim 16",
        "fp32, eager, dim 16, channels-last",
    ]
    params = [float(row.split("M params")[0].split(":")[1]) for row in rows]
    assert params[0] == params[1] < params[2] == params[3]  # the width reaches the U-Net


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--dim", "32,0"), "--dim 0 is invalid"),
        (("--dim", "wide"), "--dim wide is invalid"),
        (("--channels-last", "yes"), "--channels-last yes is invalid: choose from false, true"),
    ],
)
def test_bad_levers_fail_in_one_line(args: tuple[str, ...], message: str) -> None:
    result = bench(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "ms/step" not in result.stdout
