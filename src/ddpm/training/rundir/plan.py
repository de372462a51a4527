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

from omegaconf import DictConfig

from ddpm.checkpoint import load_checkpoint, run_dir_of
from ddpm.config import resumable_train_keys, train_keys, typed_train_config
from ddpm.errors import CheckpointError, ConfigError
from ddpm.keys import described
from ddpm.models import older_model_keys
from ddpm.training.finetune import InitSource, fine_tuned_config, init_path, read_init
from ddpm.training.rundir.bookkeeping import refuse_existing_run, same_run
from ddpm.training.rundir.flat import flatten, nest, override_keys, plain_config, shown

# flatten, override_keys and plain_config live in flat.py; the run's modules import them from here
__all__ = ["RunPlan", "flatten", "override_keys", "plain_config", "plan_run", "resumed_config"]


# ------------------------------------------------------------------------------------------ the config
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


def _covers(key: str, path: str) -> bool:
    return key == "experiment" or path == key or path.startswith(key + ".")


def resumed_config(cfg: DictConfig, saved: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The checkpoint's config, with the values this command line sets where a resumed run may change
    them. A command line that repeats the original run's overrides is fine; one that asks for a different
    loss, model, schedule, ... is refused, since the saved weights and optimizer state belong to the old."""
    current = flatten(plain_config(cfg))
    before = flatten(saved)
    # keys the checkpoint predates, at the values its weights were built with: only naming the key itself
    # on the command line asks to change one (model=ho2020 repeated from the original run does not)
    older = {f"model.{k}": v for k, v in older_model_keys(saved.get("model", {})).items()}
    before.update(older)
    asked = override_keys(overrides)
    resumable = resumable_train_keys()  # from the schema's marks (keys.py)
    merged = dict(before)
    for path in sorted(set(current) | set(before)):
        now, then = current.get(path, "<unset>"), before.get(path, "<unset>")
        if now == then:
            continue
        named = path in asked if path in older else any(_covers(k, path) for k in asked)
        if path not in before or not named:
            # A key newer than the checkpoint takes its default; one the user did not set keeps its value.
            merged[path] = now if path not in before else then
            continue
        if path not in resumable:
            may_change = described([k for k in resumable if k != "resume"], [k for k, *_ in train_keys()])
            raise ConfigError(
                f"{path}={shown(now)} differs from the resumed run's {path}={shown(then)}: a resumed run "
                f"keeps the config its weights were trained with (it may change {may_change})"
            )
        merged[path] = now
    return typed_train_config(nest(merged))


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


def check_same_init(init: str | None, saved: str | None, checkpoint: Path) -> None:
    """A continued run resumes its own checkpoint: init= may be repeated (as requeues and sweep
    continuations repeat the command line) or left out, not changed."""
    if init is None or (saved is not None and init_path(init) == saved):
        return
    started = f"init={saved}" if saved is not None else "no init="
    raise ConfigError(
        f"init={init} names another source than the run being resumed ({checkpoint} started from "
        f"{started}): a continued run resumes its own checkpoint; give the same init= or none"
    )


@dataclass(frozen=True)
class RunPlan:
    run_dir: Path
    config: DictConfig  # what the run trains with: the checkpoint's, where it continues one
    checkpoint: Path | None = None  # the checkpoint it continues from; None for a new run
    saved: dict[str, Any] | None = None  # that checkpoint's contents
    fork: bool = False  # it continues another run's checkpoint in a directory of its own
    init: InitSource | None = None  # the weights a new fine-tuned run starts from (init=PATH)

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
        if cfg.get("init") is None:
            return RunPlan(run_dir, cfg)
        source = read_init(cfg.init)
        return RunPlan(run_dir, fine_tuned_config(cfg, source, overrides), init=source)
    saved = load_resumable(checkpoint)
    check_same_init(cfg.get("init"), saved["config"].get("init"), checkpoint)
    # init= checked, and repeated as typed (a relative path, say): the saved one stands
    kept = [o for o, key in zip(overrides, override_keys(overrides), strict=True) if key != "init"]
    config = resumed_config(cfg, saved["config"], kept)
    return RunPlan(run_dir, config, checkpoint, saved, fork)
