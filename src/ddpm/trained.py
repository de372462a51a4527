"""A trained model as one object: the network and the Diffusion it was trained with, the shape of the images
it makes and, for a conditional model, its class names. ddpm-sample, ddpm-eval and the training grids all
draw images from one of these; it is built from its parts, so any source of weights can make one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from ddpm.checkpoint import weights_in
from ddpm.diffusion.gaussian import Denoiser, Diffusion
from ddpm.errors import CheckpointError
from ddpm.interop.pipeline import load_source
from ddpm.models import build_model, older_model_keys


@dataclass
class TrainedModel:
    network: nn.Module  # called as network(x_t, t, labels)
    diffusion: Diffusion
    shape: tuple[int, int, int]  # (C, H, W) of the images it makes
    class_names: tuple[str, ...] | None = None  # a conditional model's label i is class_names[i]
    data: dict[str, Any] | None = None  # the data config it was trained on, where known (plain values)
    step: int = 0
    weights: str = "model"  # "ema" or "model": which weights ``network`` holds
    default_guidance: float = 1.0  # a conditional model's guidance scale when none is asked for
    null_trained: bool = False  # whether training dropped labels (cond_drop_prob > 0): guidance needs it
    default_clip: bool = True  # clip_x0 when none is asked for (a diffusers folder's clip_sample)
    source: str = "ddpm"  # "ddpm" (a checkpoint or export) or "diffusers" (a pipeline folder)

    @property
    def conditional(self) -> bool:
        return self.class_names is not None

    def guidance(self, scale: float | None) -> float:
        """The guidance scale a request of ``scale`` means (None: the model's default; 1 unconditional)."""
        if not self.conditional:
            return 1.0
        return self.default_guidance if scale is None else float(scale)

    def denoiser(
        self, clip_x0: bool | None, labels: torch.Tensor | None = None, guidance_scale: float | None = None
    ) -> Denoiser:
        """The network read as (x0_hat, eps_hat) given ``labels``, guided with ``guidance_scale`` (None:
        the model's default) where it is conditional, x0_hat clipped as ``clip_x0`` says (None: the
        model's default)."""
        clip_x0 = self.default_clip if clip_x0 is None else clip_x0
        if not self.conditional:
            return self.diffusion.denoiser(self.network, clip_x0)
        null = len(self.class_names)
        return self.diffusion.denoiser(self.network, clip_x0, labels, self.guidance(guidance_scale), null)


def image_shape(data: dict[str, Any]) -> tuple[int, int, int]:
    """(C, H, W) of a data config's images."""
    return data["channels"], data["image_size"], data["image_size"]


def load_trained(path: str | Path, device: torch.device, ema: bool = True) -> TrainedModel:
    """Rebuild the network and its Diffusion from a checkpoint, an export or a diffusers pipeline folder
    alone. With ``ema`` the EMA weights are loaded where the file has them; ``weights`` says which were."""
    payload = load_source(path)
    config = payload["config"]
    weights = weights_in(payload, ema)  # an export holds one set, whichever was asked for when written
    names = payload.get("class_names")
    try:
        data = config["data"]
        num_classes = len(names) if names is not None else None
        model_cfg = OmegaConf.create({**config["model"], **older_model_keys(config["model"])})
        learn_sigma = bool(config.get("learn_sigma", False))  # an older file's models all had fixed variances
        network = build_model(model_cfg, data["channels"], data["image_size"], num_classes, learn_sigma)
        network.load_state_dict(payload[weights])
        diffusion = Diffusion.from_config(OmegaConf.create(config))
    except (RuntimeError, KeyError, AttributeError) as e:
        reason = str(e).splitlines()[0]
        raise CheckpointError(f"ckpt={path} does not match this ddpm's U-Net: {reason}") from e
    return TrainedModel(
        network.to(device).eval(),
        diffusion.to(device),
        image_shape(data),
        tuple(names) if names is not None else None,
        data,
        payload["step"],
        weights,
        float(config.get("guidance_scale", 1.0)) if names is not None else 1.0,
        float(config.get("cond_drop_prob", 0.0)) > 0,
        config.get("clip_x0") is not False,  # true, or null (the default), in a ddpm-train run
        payload.get("source", "ddpm"),
    )
