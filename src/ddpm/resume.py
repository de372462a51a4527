"""Exact resume: the training state a checkpoint carries besides the weights, and the config a resumed run
continues with.

The state is everything the next step depends on: optimizer moments, LR schedule, EMA weights, the RNG
states (Python, NumPy, torch CPU and CUDA) and the position in the data order. Restored, it makes the
resumed run's steps the same computations as an uninterrupted run's, so on a CPU the weights end up
bit-identical.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import CheckpointError, load_checkpoint
from ddpm.config import ConfigError, typed_train_config, validate_train
from ddpm.rundir import refuse_existing_run, same_run

# What a resumed run may change: where and how often it reports, how long it runs, where the images are.
# Everything else would make it a different run than the one its weights and optimizer come from.
RESUMABLE = (
    "resume",
    "steps",
    "device",
    "log_every",
    "sample_every",
    "checkpoint_every",
    "keep_last",
    "sample_n",
    "forward_n",
    "on_nonfinite",
    "max_nonfinite",
    "data.root",
    "data.download",
    "data.num_workers",
    "data.bad_images",
    "sampler",
    "sample_steps",
    "timestep_spacing",
    "eta",
    "ddpm_variance",
    "clip_x0",
)


# ------------------------------------------------------------------------------------------- RNG states
def rng_state() -> dict[str, Any]:
    """Every random number generator the loop may draw from, in types that weights_only loading reads."""
    _, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    # A run resumed on another kind of machine keeps going; only its random draws differ from the original.
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------- the whole state
def training_state(
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
    n_images: int,
    position: tuple[int, int],
    elapsed_s: float,
) -> dict[str, Any]:
    """What a checkpoint carries besides the weights; ``position`` is (epoch, batch) of the next step."""
    return {
        "optimizer": optimizer.state_dict(),
        "lr_schedule": lr_schedule.state_dict(),
        "rng": rng_state(),
        "data": {"n_images": n_images, "epoch": position[0], "batch": position[1]},
        "elapsed_s": elapsed_s,
    }


def restore(
    saved: dict[str, Any],
    model: torch.nn.Module,
    ema_model: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    lr_schedule: torch.optim.lr_scheduler.LRScheduler,
) -> tuple[int, float]:
    """Load a checkpoint's weights and state into freshly built objects; returns (step, elapsed_s).
    The RNG states go last: building the objects drew from the generators."""
    model.load_state_dict(saved["model"])
    if ema_model is not None:
        ema_model.load_state_dict(saved["ema"])
    state = saved["state"]
    optimizer.load_state_dict(state["optimizer"])
    lr_schedule.load_state_dict(state["lr_schedule"])
    set_rng_state(state["rng"])
    return saved["step"], state["elapsed_s"]


# ------------------------------------------------------------------------------------------ the config
def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys (or groups) a list of Hydra overrides sets: "+model.dim=8" -> "model.dim"."""
    return [o.split("=", 1)[0].lstrip("+~").split("@")[0] for o in overrides]


def _covers(key: str, path: str) -> bool:
    return key == "experiment" or path == key or path.startswith(key + ".")


def resumed_config(cfg: DictConfig, saved: dict[str, Any], overrides: list[str]) -> DictConfig:
    """The checkpoint's config, with the values this command line sets where a resumed run may change
    them. A command line that repeats the original run's overrides is fine; one that asks for a different
    loss, model, schedule, ... is refused, since the saved weights and optimizer state belong to the old."""
    current = _flatten(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    before = _flatten(saved)
    asked = override_keys(overrides)
    merged = dict(before)
    for path in sorted(set(current) | set(before)):
        now, then = current.get(path, "<unset>"), before.get(path, "<unset>")
        if path == "hydra" or path.startswith("hydra.") or now == then:
            continue
        if path not in before or not any(_covers(k, path) for k in asked):
            # A key newer than the checkpoint takes its default; one the user did not set keeps its value.
            merged[path] = now if path not in before else then
            continue
        if not any(path == k or path.startswith(k + ".") for k in RESUMABLE):
            raise ConfigError(
                f"{path}={now} differs from the resumed run's {path}={then}: a resumed run keeps the config "
                f"its weights were trained with (it may change {', '.join(RESUMABLE[1:])})"
            )
        merged[path] = now
    nested: dict[str, Any] = {}
    for path, value in merged.items():
        node = nested
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return typed_train_config(nested)


# -------------------------------------------------------------------------------- which checkpoint
def checkpoint_to_resume(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint a run continues from: None for a new run (resume=null, or resume=auto in a run
    directory without a checkpoint yet)."""
    if resume is None:
        return None
    if resume == "auto":
        last = run_dir / "checkpoints" / "last.pt"
        return last if last.is_file() else None
    path = Path(resume).expanduser()
    if not path.is_file():
        raise ConfigError(f"resume={resume} does not exist: give a checkpoint file, or resume=auto")
    if path.suffix == ".safetensors":
        raise ConfigError(f"resume={resume} holds weights only (an export): resume from a .pt checkpoint")
    return path


def load_resumable(path: Path) -> dict[str, Any]:
    payload = load_checkpoint(path, key="resume")
    if "state" not in payload:
        raise CheckpointError(
            f"resume={path} holds weights only (no optimizer or RNG state): it can be sampled from, "
            "not resumed"
        )
    return payload


def plan_resume(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str]
) -> tuple[DictConfig, Path | None, dict[str, Any] | None, bool]:
    """(config to train with, checkpoint to continue from, its payload, whether the run continues in
    another directory than the checkpoint's). Refuses a new run, or a continuation from another run,
    in a directory that already holds a run."""
    resume_from = checkpoint_to_resume(cfg.resume, run_dir)
    saved = load_resumable(resume_from) if resume_from is not None else None
    fork = resume_from is not None and not same_run(resume_from, run_dir)
    if cfg.resume is None or fork:
        refuse_existing_run(run_dir)
    if saved is not None:
        cfg = resumed_config(cfg, saved["config"], list(overrides))
    validate_train(cfg)
    return cfg, resume_from, saved, fork
