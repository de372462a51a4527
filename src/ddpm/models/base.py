"""What every ``model`` config has, the checks every U-Net needs, and the layer they share."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from omegaconf import MISSING
from torch import nn

from ddpm.errors import ConfigError


@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING  # base width
    dim_mults: list[int] = MISSING  # width multipliers, one per resolution level
    dropout: float = MISSING


class BuildModel(Protocol):
    """A model option's builder: its config entry, the image channels and size, and the number of classes
    of a class-conditional model (None: unconditional) -> the network, called as network(x_t, t, labels)
    and returning an output shaped as x_t (with ``learn_sigma``, twice its channels)."""

    def __call__(
        self,
        cfg: Any,
        channels: int,
        image_size: int,
        num_classes: int | None = None,
        learn_sigma: bool = False,
    ) -> nn.Module: ...


class CheckModel(Protocol):
    """A model option's own checks, given the block widths check_levels found and the image size."""

    def __call__(self, cfg: Any, widths: list[int], image_size: int) -> None: ...


def check_levels(cfg: Any, image_size: int) -> list[int]:
    """The checks every U-Net here needs; returns the block widths for the option's own checks."""
    if cfg.dim < 4 or cfg.dim % 2:
        raise ConfigError(f"model.dim={cfg.dim} is invalid: it must be even and >= 4 (the time embedding)")
    if len(cfg.dim_mults) == 0 or min(cfg.dim_mults) < 1:
        mults = list(cfg.dim_mults)
        raise ConfigError(f"model.dim_mults={mults} is invalid: give one or more integers >= 1")
    if not 0 <= cfg.dropout < 1:
        raise ConfigError(f"model.dropout={cfg.dropout} is invalid: it must lie in [0, 1)")
    factor = 2 ** (len(cfg.dim_mults) - 1)
    if image_size % factor:
        raise ConfigError(
            f"data.image_size={image_size} is invalid for model.dim_mults={list(cfg.dim_mults)}: "
            f"the U-Net halves it {len(cfg.dim_mults) - 1} times, so it must be a multiple of {factor}"
        )
    return sorted({cfg.dim, *(cfg.dim * m for m in cfg.dim_mults)})


class LabelEmbedding(nn.Module):
    """A class label as a vector added to the time embedding after the time MLP (guided-diffusion; diffusers'
    UNet2DModel ``num_class_embeds``): ``nn.Embedding(num_classes + 1, dim)``, whose last row is the null
    label that classifier-free guidance trains with the labels it drops and samples as the unconditional
    model. No labels (None) means the null label for every image."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embed = nn.Embedding(num_classes + 1, dim)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def forward(self, emb: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        if labels is None:
            labels = torch.full(emb.shape[:1], self.null_label, dtype=torch.long, device=emb.device)
        return emb + self.embed(labels)


class SinusoidalPositionEmbeddings(nn.Module):
    """Transformer position encoding of the timestep t (Vaswani et al. 2017)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * -(math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None, :]
        return torch.cat([args.sin(), args.cos()], dim=-1)
