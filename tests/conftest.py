"""Shared fixtures: configs composed with Hydra's compose API, and the real console scripts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_module
from omegaconf import DictConfig

from ddpm.config import register_configs

register_configs()

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


# The pinned run and samples of test_pinned.py (recorded by fixtures/record_pins.py).
FIXTURES = Path(__file__).parent / "fixtures"
PIN_RUN = TINY + ["steps=4", "timesteps=20", "sample_every=0", "checkpoint_every=0", "forward_n=0"]
PIN_SAMPLE = ["n=6", "seed=3", "device=cpu"]


def train_for_pin(cfg: DictConfig, run_dir: Path, overrides: list[str] = ()) -> list[float]:
    """Train as cfg says into run_dir; the loss of every step (cfg has log_every=1)."""
    from ddpm.train import train

    train(cfg, run_dir, list(overrides))
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(row)["loss"] for row in rows]


def pinned_samples(ckpt: Path) -> torch.Tensor:
    """What ddpm-sample draws from ckpt with PIN_SAMPLE's keys."""
    from ddpm.checkpoint import load_model
    from ddpm.config import Objective
    from ddpm.sampling import generate

    cfg = compose("sample", [f"ckpt={ckpt}", *PIN_SAMPLE])
    model, schedule, payload = load_model(ckpt, torch.device("cpu"))
    trained = payload["config"]["data"]
    shape = (trained["channels"], trained["image_size"], trained["image_size"])
    objective = Objective[payload["config"]["objective"]]
    return generate(model, schedule, objective, cfg, cfg.n, shape, cfg.seed, cfg.batch_size, "cpu")


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
