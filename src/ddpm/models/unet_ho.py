"""The U-Net of Ho et al. 2020 (their CIFAR-10 model: 35.7M parameters with ch=128, ch_mult=(1,2,2,2)).

A PixelCNN++-style backbone: at each resolution ``num_res_blocks`` residual blocks on the way down and
``num_res_blocks + 1`` on the way up (each taking one skip connection), self-attention at the resolutions
listed in ``attn_resolutions``, strided-conv downsampling, nearest-neighbour + conv upsampling, GroupNorm
with 32 groups, and dropout inside every residual block.

Two variants (``model.variant``): ``original`` builds the layers of Ho et al.'s TensorFlow code (and of
diffusers' conversion of their weights): GroupNorm epsilon 1e-6 (TensorFlow's default) and "SAME"
downsampling, which pads one row and column at the bottom and right only. ``legacy`` is ddpm's first
ho2020 (PyTorch's epsilon 1e-5, symmetric padding 1), kept so that checkpoints written before the variant
existed, which have no ``variant`` key, compute what they always computed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import MISSING
from torch import nn

from ddpm import checks
from ddpm.errors import ConfigError
from ddpm.models.base import LabelEmbedding, ModelConfig, SinusoidalPositionEmbeddings
from ddpm.registry import Option

GROUPS = 32  # GroupNorm groups, fixed by the architecture


@dataclass(frozen=True)
class Variant:
    norm_eps: float
    same_padding: bool  # TensorFlow "SAME" downsampling: pad (0, 1, 0, 1), then convolve unpadded


VARIANTS = {"original": Variant(1e-6, True), "legacy": Variant(1e-5, False)}
LEGACY = "legacy"  # what a file without model.variant holds


@dataclass
class HoUNetConfig(ModelConfig):
    num_res_blocks: int = MISSING
    attn_resolutions: list[int] = MISSING  # image sizes (after halving) that get self-attention
    variant: str = MISSING  # original (Ho et al.'s layers) | legacy (ddpm's first ho2020)


def norm(channels: int, eps: float) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=eps)


class Downsample(nn.Conv2d):
    """A stride-2 3x3 convolution; with ``same_padding`` TensorFlow's "SAME" (one row and column of zeros
    at the bottom and right), else PyTorch's symmetric padding 1. A Conv2d itself, so its weights keep the
    names the legacy variant's checkpoints use."""

    def __init__(self, dim: int, same_padding: bool) -> None:
        super().__init__(dim, dim, 3, stride=2, padding=0 if same_padding else 1)
        self.same_padding = same_padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, (0, 1, 0, 1)) if self.same_padding else x)


class ResBlock(nn.Module):
    """h = conv(swish(norm(x))) + dense(swish(temb)); h = conv(dropout(swish(norm(h)))); x + h."""

    def __init__(self, dim: int, dim_out: int, temb_dim: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.norm1 = norm(dim, eps)
        self.conv1 = nn.Conv2d(dim, dim_out, 3, padding=1)
        self.temb = nn.Linear(temb_dim, dim_out)
        self.norm2 = norm(dim_out, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(dim_out, dim_out, 3, padding=1)
        self.skip = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head softmax self-attention over all positions, with 1x1 projections."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.norm = norm(dim, eps)
        self.qkv = nn.Conv2d(dim, dim * 3, 1)
        self.out = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = (z.reshape(b, 1, c, h * w).transpose(-1, -2) for z in self.qkv(self.norm(x)).chunk(3, 1))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, 1, hw, c)
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h, w))


class Level(nn.Module):
    """The residual blocks (and attention) of one resolution on one path."""

    def __init__(self, blocks: list[ResBlock], attn: bool, eps: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attns = nn.ModuleList(
            [AttnBlock(b.conv2.out_channels, eps) if attn else nn.Identity() for b in blocks]
        )


class HoUNet(nn.Module):
    def __init__(
        self,
        channels: int,
        image_size: int,
        ch: int = 128,
        ch_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_res_blocks: int = 2,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.1,
        num_classes: int | None = None,
        learn_sigma: bool = False,  # 2C outputs: the objective's, then the variance's v (Nichol & Dhariwal)
        variant: str = "original",
    ) -> None:
        super().__init__()
        self.channels = channels
        self.variant = variant
        eps, same = VARIANTS[variant].norm_eps, VARIANTS[variant].same_padding
        self.downsample_factor = 2 ** (len(ch_mult) - 1)
        temb_dim = ch * 4
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(ch),
            nn.Linear(ch, temb_dim),
            nn.SiLU(),
            nn.Linear(temb_dim, temb_dim),
        )
        self.conv_in = nn.Conv2d(channels, ch, 3, padding=1)

        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        skip_dims, dim, res = [ch], ch, image_size
        for i, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResBlock(dim, ch * mult, temb_dim, dropout, eps))
                dim = ch * mult
                skip_dims.append(dim)
            self.down.append(Level(blocks, res in attn_resolutions, eps))
            if i < len(ch_mult) - 1:
                self.downsample.append(Downsample(dim, same))
                skip_dims.append(dim)
                res //= 2

        self.mid1 = ResBlock(dim, dim, temb_dim, dropout, eps)
        self.mid_attn = AttnBlock(dim, eps)
        self.mid2 = ResBlock(dim, dim, temb_dim, dropout, eps)

        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, mult in reversed(list(enumerate(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResBlock(dim + skip_dims.pop(), ch * mult, temb_dim, dropout, eps))
                dim = ch * mult
            self.up.append(Level(blocks, res in attn_resolutions, eps))
            if i > 0:
                self.upsample.append(nn.Conv2d(dim, dim, 3, padding=1))
                res *= 2

        self.norm_out = norm(dim, eps)
        self.conv_out = nn.Conv2d(dim, channels * (2 if learn_sigma else 1), 3, padding=1)
        # built last, so the other layers draw the initial weights an unconditional U-Net draws
        self.label_emb = LabelEmbedding(num_classes, temb_dim) if num_classes is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, labels); an unconditional U-Net ignores ``labels``, so the step and the samplers
        call every network alike; a conditional one reads None as the null label."""
        temb = self.time_mlp(t)
        if self.label_emb is not None:
            temb = self.label_emb(temb, labels)
        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(h, temb))
                skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
                skips.append(h)

        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)

        for i, level in enumerate(self.up):
            for block, attn in zip(level.blocks, level.attns, strict=True):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2, mode="nearest"))

        return self.conv_out(F.silu(self.norm_out(h)))


def check_ho_unet(cfg: Any, widths: list[int], image_size: int) -> None:
    checks.at_least("model.num_res_blocks", cfg.num_res_blocks, 1)
    checks.one_of("model.variant", cfg.variant, VARIANTS)
    if any(w % GROUPS for w in widths):
        raise ConfigError(
            f"model.dim={cfg.dim} is invalid for model=ho2020: its GroupNorm has {GROUPS} groups, so every "
            f"width {widths} must be a multiple of {GROUPS}"
        )
    resolutions = [image_size // 2**i for i in range(len(cfg.dim_mults))]
    stray = [r for r in cfg.attn_resolutions if r not in resolutions]
    if stray:
        raise ConfigError(
            f"model.attn_resolutions={list(cfg.attn_resolutions)} is invalid: {stray} is not a "
            f"resolution of this U-Net ({', '.join(map(str, resolutions))})"
        )


def build_ho_unet(
    cfg: Any, channels: int, image_size: int, num_classes: int | None = None, learn_sigma: bool = False
) -> HoUNet:
    return HoUNet(
        channels=channels,
        image_size=image_size,
        ch=cfg.dim,
        ch_mult=tuple(cfg.dim_mults),
        num_res_blocks=cfg.num_res_blocks,
        attn_resolutions=tuple(cfg.attn_resolutions),
        dropout=cfg.dropout,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
        variant=cfg.get("variant", LEGACY),
    )


HO2020 = Option("ho2020", HoUNetConfig, build_ho_unet, check_ho_unet)
