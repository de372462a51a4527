"""Fine-tuning: ``init=PATH`` starts a new run from the weights of a ddpm checkpoint, its export or a
diffusers pipeline folder. The source fixes what its weights were trained as (the network, the objective,
the variances and the class count); the run chooses the rest (data, schedule, T, optimizer, steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ddpm.checkpoint import weights_in
from ddpm.config import typed_train_config
from ddpm.errors import CheckpointError, ConfigError
from ddpm.interop.pipeline import load_source
from ddpm.models import older_model_keys
from ddpm.training.rundir.flat import flatten, nest, override_keys, plain_config, shown

# what the weights were trained as, besides model.*: a run that changes them would train other weights
INHERITED = ("objective", "learn_sigma", "class_cond")
FREE_MODEL_KEYS = ("model.dropout",)  # a regulariser of training, not part of the weights


@dataclass(frozen=True)
class InitSource:
    """The weights a fine-tuned run starts from, and what the source says they are."""

    path: str  # as the run's config records it: absolute
    config: dict[str, Any]  # the source's settings (plain values)
    weights: dict[str, torch.Tensor]
    which: str  # "ema" or "model"
    step: int
    class_names: tuple[str, ...] | None

    def describe(self) -> str:
        weights = f"{self.which} weights of step {self.step:,}"
        return f"fine-tuning from init={self.path} ({weights}), with a fresh optimizer, from step 0"

    def schedule_note(self, cfg: DictConfig) -> str | None:
        """A warning where the run noises with another schedule or T than the weights learnt to undo."""
        theirs = (self.config["schedule"], int(self.config["timesteps"]))
        ours = (plain_config(cfg)["schedule"], int(cfg.timesteps))
        if theirs == ours:
            return None
        return (
            f"warning: init's weights were trained for the {theirs[0]['name']} schedule at T={theirs[1]}, "
            f"this run uses {ours[0]['name']} at T={ours[1]}: it starts from a network that denoises "
            "another forward process"
        )


def init_path(init: str) -> str:
    """The absolute path a config's ``init`` names, so a resumed run compares it wherever it starts."""
    return str(Path(init).expanduser().resolve())


def read_init(init: str) -> InitSource:
    # memory-mapped, as a resumed checkpoint is: the callback plans with the config, train() loads weights
    payload = load_source(init, key="init", mmap=True)
    which = weights_in(payload)
    names = payload.get("class_names")
    return InitSource(
        init_path(init),
        payload["config"],
        payload[which],
        which,
        int(payload.get("step", 0)),
        tuple(names) if names is not None else None,
    )


def inherited(source: InitSource) -> dict[str, Any]:
    """The flat config keys the source fixes, at its values."""
    config = source.config
    model = {**config["model"], **older_model_keys(config["model"])}
    return {
        **flatten({"model": model}),
        "objective": config.get("objective", "eps"),
        "learn_sigma": bool(config.get("learn_sigma", False)),
        "class_cond": source.class_names is not None,
    }


def _named(path: str, asked: Sequence[str]) -> bool:
    """Whether the command line asked for ``path``: model=X names the family (model.name) and leaves its
    keys to the source; model.k=v names model.k."""
    if path == "model.name":
        return "model" in asked or path in asked
    return path in asked


def fine_tuned_config(cfg: DictConfig, source: InitSource, overrides: Sequence[str]) -> DictConfig:
    """The run's config with the source's network, objective, variances and classes. A command-line value
    that contradicts one is refused, naming both; so is data of another image size or channel count."""
    current = flatten(plain_config(cfg))
    asked = override_keys(overrides)
    merged = dict(current)
    for path in list(current):  # keys of the run's model family that the source's does not have
        if path.startswith("model."):
            del merged[path]
    for path, theirs in inherited(source).items():
        mine = current.get(path, "<unset>")
        if path in FREE_MODEL_KEYS and path in asked:
            merged[path] = mine
            continue
        if mine != theirs and _named(path, asked):
            raise ConfigError(
                f"{path}={shown(mine)} contradicts init={source.path}'s {path}={shown(theirs)}: a "
                "fine-tuned run keeps the network, objective, variances and classes its weights were "
                "trained with (model.dropout may differ)"
            )
        merged[path] = theirs
    data = source.config["data"]
    theirs_shape, mine_shape = _shape(data), _shape(current, "data.")
    if theirs_shape != mine_shape:
        raise ConfigError(
            f"init={source.path} makes {theirs_shape} images, data={current['data.name']} is {mine_shape}: "
            "fine-tuning keeps the source's image size and channels (set data.image_size and data.channels)"
        )
    merged["init"] = source.path
    return typed_train_config(nest(merged))


def _shape(data: dict[str, Any], prefix: str = "") -> str:
    size, channels = data[f"{prefix}image_size"], data[f"{prefix}channels"]
    return f"{size}x{size}x{channels}"


def load_init_weights(model: torch.nn.Module, source: InitSource) -> None:
    try:
        model.load_state_dict(source.weights)
    except RuntimeError as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"init={source.path} does not match this ddpm's U-Net: {reason}") from e


def check_classes(source: InitSource, class_names: tuple[str, ...] | None) -> None:
    """A conditional source's label embedding has one row per class (and the null label's): the run's data
    must have as many classes."""
    if source.class_names is None or class_names is None or len(class_names) == len(source.class_names):
        return
    raise ConfigError(
        f"init={source.path} is conditional on {len(source.class_names)} classes, the data have "
        f"{len(class_names)}: fine-tuning keeps the label embedding, so give data with "
        f"{len(source.class_names)} classes"
    )
