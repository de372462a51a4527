"""The noise predictors (the ``model`` config group): one factory over the registered U-Nets."""

from __future__ import annotations

from typing import Any

from torch import nn

from ddpm.models.base import BuildModel, CheckModel, ModelConfig, check_levels
from ddpm.models.unet import UNET
from ddpm.models.unet_ho import HO2020
from ddpm.registry import Registry

MODELS: Registry[BuildModel, CheckModel] = Registry("model", UNET, HO2020)

__all__ = ["MODELS", "ModelConfig", "build_model", "check_model"]


def check_model(cfg: Any, image_size: int) -> None:
    option = MODELS[cfg.name]
    option.check(cfg, check_levels(cfg, image_size), image_size)


def build_model(
    cfg: Any, channels: int, image_size: int, num_classes: int | None = None, learn_sigma: bool = False
) -> nn.Module:
    """The noise predictor of a ``model`` config entry for (channels, image_size, image_size) images,
    class-conditional on ``num_classes`` classes where given; with ``learn_sigma`` it outputs 2C channels,
    the objective's C and then the C of the variance interpolation v."""
    return MODELS[cfg.name].build(cfg, channels, image_size, num_classes, learn_sigma)
