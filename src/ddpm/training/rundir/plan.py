"""One resume plan: the run directory, the checkpoint a run continues from and the config it continues
with are decided by ``plan_run``, which both the Hydra callback (before Hydra writes into the run
directory) and ``train()`` call."""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import load_checkpoint, run_dir_of
from ddpm.config import resumable_train_keys, train_keys, typed_train_config
from ddpm.errors import CheckpointError, ConfigError
from ddpm.keys import described
from ddpm.training.rundir.bookkeeping import refuse_existing_run, same_run


# ------------------------------------------------------------------------------------------ the config
def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"dim": 8}} -> {"model.dim": 8}."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def override_keys(overrides: Sequence[str]) -> list[str]:
    """The config keys (or groups) that Hydra overrides set, by Hydra's own parser: "+model.dim=8" ->
    "model.dim", "experiment=x" -> "experiment"."""
    return [o.key_or_group for o in OverridesParser.create().parse_overrides(list(overrides))]


def shell_override(key: str, value: object) -> str:
    """key=value as typed into a shell for Hydra, for the commands a message suggests: a value that Hydra's
    grammar would misread (a sweep job's folder holds '=' and ',') is quoted for Hydra, and the whole
    argument for the shell."""
    text = str(value)
    if re.fullmatch(r"[\w./\-]+", text):
        return f"{key}={text}"
    # in Hydra's quoted strings a backslash is only special before a quote (or the closing one)
    escaped = re.sub(r"(\\*)('|$)", lambda m: 2 * m.group(1) + ("\\'" if m.group(2) else ""), text)
    quoted = f"'{escaped}'"
    return shlex.quote(f"{key}={quoted}") if re.search(r'["$`\\!]', quoted) else f'"{key}={quoted}"'


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain Python values (enums as names), without Hydra's own node."""
    mine = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    config = OmegaConf.to_container(mine, resolve=True, enum_to_str=True)
    assert isinstance(config, dict)
    return config


def _covers(key: str, path: str) -> bool:
    return key == "experiment" or path == key or path.startswith(key + ".")


def resumed_config(cfg: DictConfig, saved: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The checkpoint's config, with the values this command line sets where a resumed run may change
    them. A command line that repeats the original run's overrides is fine; one that asks for a different
    loss, model, schedule, ... is refused, since the saved weights and optimizer state belong to the old."""
    current = flatten(plain_config(cfg))
    before = flatten(saved)
    asked = override_keys(overrides)
    resumable = resumable_train_keys()  # from the schema's marks (keys.py)
    merged = dict(before)
    for path in sorted(set(current) | set(before)):
        now, then = current.get(path, "<unset>"), before.get(path, "<unset>")
        if now == then:
            continue
        if path not in before or not any(_covers(k, path) for k in asked):
            # A key newer than the checkpoint takes its default; one the user did not set keeps its value.
            merged[path] = now if path not in before else then
            continue
        if path not in resumable:
            may_change = described([k for k in resumable if k != "resume"], [k for k, *_ in train_keys()])
            raise ConfigError(
                f"{path}={now} differs from the resumed run's {path}={then}: a resumed run keeps the config "
                f"its weights were trained with (it may change {may_change})"
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
    # memory-mapped: the callback reads the config, train() the state, and neither copies it all twice
    payload = load_checkpoint(path, key="resume", mmap=True)
    if "state" not in payload:
        raise CheckpointError(
            f"resume={path} holds weights only (no optimizer or RNG state): it can be sampled from, "
            "not resumed"
        )
    return payload


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    config: DictConfig  # what the run trains with: the checkpoint's, where it continues one
    checkpoint: Path | None = None  # the checkpoint it continues from; None for a new run
    saved: dict[str, Any] | None = None  # that checkpoint's contents
    fork: bool = False  # it continues another run's checkpoint in a directory of its own

    @property
    def continues_in_place(self) -> bool:
        return self.checkpoint is not None and not self.fork


def plan_run(
    cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), run_dir_given: bool = True
) -> RunPlan:
    """Decide where the run goes and what it continues. ``overrides`` are the command line's (a resumed
    run checks them against its saved config). Without ``run_dir_given`` (no hydra.run.dir on the command
    line), resume=PATH continues in the checkpoint's own run directory. A new run, or a continuation of
    another run's checkpoint, is refused in a directory that already holds a run."""
    checkpoint = checkpoint_to_resume(cfg.resume, run_dir)
    if checkpoint is not None and cfg.resume != "auto" and not run_dir_given:
        run_dir = run_dir_of(checkpoint.resolve())
    fork = checkpoint is not None and not same_run(checkpoint, run_dir)
    if cfg.resume is None or fork:
        refuse_existing_run(run_dir)
    if checkpoint is None:
        return RunPlan(run_dir, cfg)
    saved = load_resumable(checkpoint)
    config = resumed_config(cfg, saved["config"], overrides)
    return RunPlan(run_dir, config, checkpoint, saved, fork)
