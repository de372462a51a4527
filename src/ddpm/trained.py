"""A trained model as one object: the network with the schedule, objective and image shape it was trained
for, and its config. ddpm-sample, ddpm-eval and the training grids all draw images from one of these."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ddpm.checkpoint import load_checkpoint
from ddpm.diffusion.forward import Denoiser, Objective, make_denoiser
from ddpm.diffusion.schedules import Schedule, build_schedule
from ddpm.errors import CheckpointError
from ddpm.models import build_model


@dataclass
class TrainedModel:
    model: nn.Module
    schedule: Schedule
    objective: Objective
    shape: tuple[int, int, int]  # (C, H, W) of the images it makes
    config: dict[str, Any]  # the training config, as plain values
    step: int = 0
    weights: str = "model"  # "ema" or "model": which weights ``model`` holds

    @classmethod
    def from_config(
        cls,
        model: nn.Module,
        schedule: Schedule,
        config: dict[str, Any],
        step: int = 0,
        weights: str = "model",
    ) -> TrainedModel:
        data = config["data"]
        objective = Objective[config.get("objective", "eps")]  # version 1 checkpoints predate objectives
        return cls(
            model,
            schedule,
            objective,
            (data["channels"], data["image_size"], data["image_size"]),
            config,
            step,
            weights,
        )

    def denoiser(self, clip_x0: bool) -> Denoiser:
        return make_denoiser(self.model, self.schedule, self.objective, clip_x0)


def load_trained(path: str | Path, device: torch.device, ema: bool = True) -> TrainedModel:
    """Rebuild the U-Net and the schedule from a checkpoint or export alone. With ``ema`` the EMA weights
    are loaded where the file has them; ``weights`` says which were."""
    payload = load_checkpoint(path)
    config = payload["config"]
    # an export holds one set of weights, whichever was asked for when it was written
    weights = "ema" if (ema and "ema" in payload) or "model" not in payload else "model"
    try:
        model = build_model(_attrs(config["model"]), config["data"]["channels"], config["data"]["image_size"])
        model.load_state_dict(payload[weights])
        schedule = build_schedule(_attrs(config["schedule"]), config["timesteps"])
    except (RuntimeError, KeyError, AttributeError) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"ckpt={path} does not match this ddpm's U-Net: {reason}") from e
    return TrainedModel.from_config(
        model.to(device).eval(), schedule.to(device), config, payload["step"], weights
    )


def _attrs(group: dict[str, Any]) -> Any:
    """A saved config group as an object with attributes, as the builders read a composed config."""
    from omegaconf import OmegaConf

    return OmegaConf.create(group)
