"""Real faults against the real console script: kill -9, SIGTERM, a second run in the same folder, a
sweep run twice."""

import os
import random
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, logged_steps, start, wait_for_step

from ddpm.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# ~10 ms a step on a CPU: long enough to be caught anywhere, short enough to finish in seconds.
LONG = TINY + ["steps=250", "checkpoint_every=50", "sample_every=0", "forward_n=0", "timesteps=20"]


def run_to_end(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    proc = start(*args, cwd=cwd)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_kill_9_at_a_random_moment_loses_at_most_checkpoint_every_steps(tmp_path):
    whole = run_to_end(*LONG, "hydra.run.dir=whole", cwd=tmp_path)
    assert "done: 250 steps" in whole.stdout

    # A seeded draw, so a failure repeats; the moment the kill lands within that step still varies.
    target = random.Random(4).randrange(60, 220)
    proc = start(*LONG, "hydra.run.dir=cut", cwd=tmp_path)
    seen = wait_for_step(proc, tmp_path / "cut", target)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    last_logged = logged_steps(tmp_path / "cut")[-1]

    resumed = run_to_end("hydra.run.dir=cut", "resume=auto", cwd=tmp_path)
    found = re.search(r"resuming from .*last.pt at step (\d+) of 250", resumed.stdout)
    assert found, (target, seen, resumed.stdout)
    restart = int(found.group(1))
    assert 0 <= last_logged - restart <= 50, (target, last_logged, restart)
    assert logged_steps(tmp_path / "cut") == list(range(1, 251))
    assert not list((tmp_path / "cut/checkpoints").glob(".*.tmp"))
    a, b = (load_checkpoint(tmp_path / r / "checkpoints/last.pt") for r in ("whole", "cut"))
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"][k], b["ema"][k]) for k in a["ema"])


def test_sigterm_saves_says_how_to_resume_and_resume_keeps_the_record(tmp_path):
    proc = start(*LONG, "loss=l1", "hydra.run.dir=run", cwd=tmp_path)
    wait_for_step(proc, tmp_path / "run", 40)
    original = (tmp_path / "run/.hydra/config.yaml").read_bytes()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    stopped = re.fullmatch(
        r"ddpm-train: stopped by SIGTERM at step (\d+) of 250; checkpoint \S+step_(\d+)\.pt; "
        r"continue with: ddpm-train hydra.run.dir=\S+run resume=auto",
        lines[0],
    )
    assert stopped and stopped.group(1) == str(int(stopped.group(2))), lines[0]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["step"] == int(stopped.group(1))

    resumed = run_to_end("hydra.run.dir=run", "resume=auto", "steps=60", cwd=tmp_path)
    assert f"at step {stopped.group(1)} of 60" in resumed.stdout
    assert (tmp_path / "run/.hydra/config.yaml").read_bytes() == original  # the first run's record
    (record,) = (tmp_path / "run/.hydra").glob("resumed_*/overrides.yaml")
    assert yaml.safe_load(record.read_text()) == ["resume=auto", "steps=60"]
    assert load_checkpoint(tmp_path / "run/checkpoints/last.pt")["config"]["loss"] == "l1"


def test_a_second_run_into_the_same_folder_is_refused_before_hydra_writes(tmp_path, cli):
    first = cli("ddpm-train", *TINY, "steps=1", "hydra.run.dir=run", cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    again = cli("ddpm-train", *TINY, "steps=2", "loss=l1", "hydra.run.dir=run", cwd=tmp_path)
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "ddpm-train: error: hydra.run.dir=run already holds a run: continue it with resume=auto, "
        "or choose another hydra.run.dir"
    )
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before


def test_resume_from_a_path_continues_in_that_run(tmp_path, cli):
    first = cli(
        "ddpm-train", *TINY, "steps=2", "checkpoint_every=1", "keep_last=0", "hydra.run.dir=run", cwd=tmp_path
    )
    assert first.returncode == 0, first.stderr
    again = cli("ddpm-train", "resume=run/checkpoints/step_000001.pt", "steps=3", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "at step 1 of 3" in again.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no new run folder
    assert logged_steps(tmp_path / "run") == [1, 2, 3]


def test_a_sweep_run_twice_is_refused_and_resumes_with_auto(tmp_path, cli):
    sweep = [
        "-m",
        "loss=l1,l2",
        *TINY,
        "steps=2",
        "sample_every=0",
        "eval_at_end=false",
        "hydra.sweep.dir=sweep",
    ]
    assert cli("ddpm-train", *sweep, cwd=tmp_path).returncode == 0
    again = cli("ddpm-train", *sweep, cwd=tmp_path)
    assert again.returncode == 2 and "hydra.sweep.dir=sweep already holds runs" in again.stderr
    more = cli("ddpm-train", *[a.replace("steps=2", "steps=3") for a in sweep], "resume=auto", cwd=tmp_path)
    assert more.returncode == 0, more.stderr
    assert more.stdout.count("at step 2 of 3") == 2
    folders = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert len(folders) == 2 and "loss=l1" in folders[0] and "steps" not in folders[0]
