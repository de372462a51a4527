"""Shared fixtures: configs composed with Hydra's compose API, and the real console scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
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


@pytest.fixture
def compose_cfg() -> Callable[..., DictConfig]:
    """compose_cfg("train", ["loss=l1", ...]) -> the composed config, as ddpm-train would see it."""

    def _compose(name: str = "train", overrides: list[str] | None = None) -> DictConfig:
        with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
            return compose(config_name=name, overrides=overrides or [])

    return _compose


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
