"""Shared fixtures: configs composed with Hydra's compose API, and the real console scripts."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig
from PIL import Image

from ddpm.config import register_configs

register_configs()

# Parallel test workers (pytest -n) each get one thread: two workers of two spinning OpenMP threads each
# on a 2-core machine make a tiny training step forty times slower. Subprocesses inherit the variable.
if "PYTEST_XDIST_WORKER" in os.environ:
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"

# A U-Net small enough that a CPU trains and samples it in seconds.
TINY = [
    "model.dim=8",
    "model.dim_mults=[1,2]",
    "model.resnet_block_groups=2",
    "model.attn_heads=2",
    "model.attn_dim_head=8",
    "batch_size=16",
    "sample_n=4",
    "log_every=1",
    "device=cpu",
    # fp32 on every CPU: precision=auto takes bf16 on a CPU with AVX512-BF16, and the tolerances of the
    # tests that compare two runs follow from fp32 rounding (bf16 has its own tests)
    "precision=fp32",
]

BIN = Path(sys.executable).parent


def compose(name: str = "train", overrides: list[str] | None = None) -> DictConfig:
    """The config ddpm-<name> composes from these overrides (without Hydra's run-directory handling)."""
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        return hydra_compose(config_name=name, overrides=overrides or [])


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("train", ["loss=l1", ...]) -> the composed config, as ddpm-train would see it."""
    return compose


def cheap_eval(cache: Path) -> list[str]:
    """ddpm-train's eval.* with just enough for a full-rank FID in the classifier's 128 features, scored in
    a second or two; the classifier is cached in ``cache``, not in the user's home."""
    return [
        "eval.n=130",
        "eval.sample_steps=5",
        "eval.n_real=200",
        "eval.kid_subsets=5",
        "eval.kid_subset_size=100",
        "eval.classifier_steps=30",
        f"eval.classifier_cache={cache}",
    ]


# The pinned run and samples of test_pinned.py (recorded by fixtures/record_pins.py).
FIXTURES = Path(__file__).parent / "fixtures"
# The recipe is spelt out, so that a change of the defaults does not move the pins: the values the pins were
# recorded at (the 1,500-step job's constant lr 1e-3 and EMA 0.999 with 10 warm-up steps).
PIN_RECIPE = ["lr=1e-3", "lr_warmup=0", "lr_decay=none", "ema.decay=0.999", "ema.warmup=10", "loss=huber"]
PIN_RUN = [*TINY, "steps=4", "timesteps=20", "sample_every=0", "checkpoint_every=0", "forward_n=0"]
PIN_RUN += PIN_RECIPE
PIN_SAMPLE = ["n=6", "seed=3", "device=cpu"]


def train_for_pin(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> list[float]:
    """Train as cfg says into run_dir; the loss of every step (cfg has log_every=1)."""
    from ddpm.training.loop import train

    train(cfg, run_dir, list(overrides))
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["loss"] for row in rows]


def pinned_samples(ckpt: Path) -> torch.Tensor:
    """What ddpm-sample draws from ckpt with PIN_SAMPLE's keys."""
    from ddpm.diffusion.generate import generate
    from ddpm.diffusion.sampling import SamplingOptions
    from ddpm.trained import load_trained

    cfg = compose("sample", [f"ckpt={ckpt}", *PIN_SAMPLE])
    trained = load_trained(ckpt, torch.device("cpu"))
    return generate(trained, SamplingOptions.from_config(cfg), cfg.n, cfg.seed, cfg.batch_size)


def run_cli(
    prog: str, *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run a console script (ddpm-train / ddpm-sample) in a subprocess, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    full_env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    return subprocess.run(
        [str(BIN / prog), *args], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess]:
    return run_cli


def start(*args: str, cwd: Path, command: tuple[str, ...] = ("ddpm-train",)) -> subprocess.Popen:
    """ddpm-train (or ``command``, e.g. torchrun ... ddpm-train) running in the background."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    return subprocess.Popen(
        [str(BIN / command[0]), *command[1:], *args],
        cwd=cwd,
        env={**env, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def logged_steps(run: Path) -> list[int]:
    """The steps of a run's metrics.jsonl rows, as far as they are written."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line being written
            steps.append(json.loads(line)["step"])
    return steps


def wait_for_step(proc: subprocess.Popen, run: Path, step: int, timeout: float = 300) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(run)
        if steps and steps[-1] >= step:
            return steps[-1]
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture
def in_process(monkeypatch, capsys) -> Callable[..., subprocess.CompletedProcess]:
    """in_process("ddpm-sample", *args, cwd=...): like run_cli, but the console script's entry point runs
    in this process, which saves the seconds of starting Python and importing torch."""
    from ddpm import cli as entry_points

    def _run(prog: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
        monkeypatch.chdir(cwd)
        main = getattr(entry_points, f"{prog.removeprefix('ddpm-')}_main")
        code, _, _ = run_entry(main, list(args), capsys, keep_output=True)
        out = capsys.readouterr()
        return subprocess.CompletedProcess([prog, *args], code, out.out, out.err)

    return _run


def run_entry(
    main: Callable[[], None], args: list[str], capsys, keep_output: bool = False
) -> tuple[int, list[str], str]:
    """A console script's entry point (cli.train_main, ...) run in this process, as the script would run
    it: (exit status, stderr lines, all output). Seconds faster than a subprocess."""
    old = sys.argv
    sys.argv = [main.__name__, *args]
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old
    if keep_output:  # for the caller to read
        return code, [], ""
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines(), captured.out + captured.err


def assert_refused(prog: str, code: int, lines: list[str], output: str, args: list[str]) -> None:
    """A refusal is one line on stderr, a non-zero exit status and no trace."""
    assert code != 0, args
    assert len(lines) == 1, (args, lines)
    assert lines[0].startswith(f"{prog}: error: "), (args, lines)
    assert "Traceback" not in output, args


# ------------------------------------------------------------------------------------------ files to test on
def write_random(path: Path, shape: tuple[int, ...] = (16, 16, 3), seed: int = 0) -> None:
    """An image of random pixels, in the format the file name's extension says."""
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)).save(path)


def write_truncated(path: Path) -> None:
    """A valid image file cut to half its bytes: the header opens, the pixel data ends early."""
    write_random(path, (32, 32, 3))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def write_bad_files(root: Path) -> None:
    """Four files that cannot be read, named so that they sort first."""
    write_truncated(root / "a_cut.jpg")
    write_truncated(root / "b_cut.png")
    (root / "c_text.jpg").write_text("not an image, whatever the extension says")
    (root / "d_empty.png").write_bytes(b"")


class Exploit:
    """A pickle that runs a shell command when loaded: what a crafted checkpoint would hold."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def signal_at(monkeypatch: pytest.MonkeyPatch, step: int, signum: int = signal.SIGTERM) -> None:
    """Deliver a real signal to this process during training step ``step`` (counted from this call)."""
    from ddpm.training.step import TrainStep  # its optimizing part, which the loop's step calls

    real, calls = TrainStep.optimize, []

    def step_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            signal.raise_signal(signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(TrainStep, "optimize", step_then_signal)


# ------------------------------------------------------------------------------- class-conditional runs
# guidance_scale=2 pins the scale these tests were written against (train.yaml's default is 1, measured)
COND_RUN = PIN_RUN + ["class_cond=true", "sample_n=20", "guidance_scale=2"]


@pytest.fixture(scope="session")
def cond_ckpt(tmp_path_factory) -> Path:
    """A tiny class-conditional checkpoint on the digits (labels dropped with the default 0.1)."""
    from ddpm.training.loop import train

    run = tmp_path_factory.mktemp("cond") / "run"
    train(compose("train", COND_RUN), run)
    return run / "checkpoints" / "last.pt"


@pytest.fixture(scope="session")
def never_dropped_ckpt(tmp_path_factory) -> Path:
    """A tiny class-conditional checkpoint trained with cond_drop_prob=0: its null label never trained."""
    from ddpm.training.loop import train

    run = tmp_path_factory.mktemp("never_dropped") / "run"
    train(compose("train", COND_RUN + ["cond_drop_prob=0", "guidance_scale=1"]), run)
    return run / "checkpoints" / "last.pt"
