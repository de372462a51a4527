"""The noise predictors (the ``model`` config group): one factory over the registered U-Nets."""

from __future__ import annotations

from typing import Any

from torch import nn

from ddpm.models.base import BuildModel, CheckModel, ModelConfig, check_levels
from ddpm.models.unet import UNET
from ddpm.models.unet_ho import HO2020, LEGACY
from ddpm.registry import Registry

MODELS: Registry[BuildModel, CheckModel] = Registry("model", UNET, HO2020)

__all__ = ["MODELS", "ModelConfig", "build_model", "check_model", "older_model_keys"]


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


def older_model_keys(model: dict[str, Any]) -> dict[str, Any]:
    """The model keys an older file lacks, at the values its network was built with: an ho2020 written
    before ``model.variant`` existed is the legacy variant."""
    return {"variant": LEGACY} if model.get("name") == HO2020.name and "variant" not in model else {}
