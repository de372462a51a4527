"""``model=unet``: the U-Net noise predictor eps_theta(x_t, t) of the annotated DDPM (after Ho et al.)."""

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


@dataclass
class UNetConfig(ModelConfig):
    resnet_block_groups: int = MISSING  # GroupNorm groups in the residual blocks
    attn_heads: int = MISSING
    attn_dim_head: int = MISSING


class WeightStandardizedConv2d(nn.Conv2d):
    """Conv2d whose kernel is standardised per output channel; works well with GroupNorm (Qiao et al.)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = 1e-5 if x.dtype == torch.float32 else 1e-3
        w = self.weight
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), keepdim=True, unbiased=False)
        return F.conv2d(x, (w - mean) * (var + eps).rsqrt(), self.bias, self.stride, self.padding)


class Block(nn.Module):
    def __init__(self, dim: int, dim_out: int, groups: int) -> None:
        super().__init__()
        self.proj = WeightStandardizedConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x: torch.Tensor, scale_shift: tuple[torch.Tensor, torch.Tensor] | None = None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResnetBlock(nn.Module):
    """Two conv blocks; the time embedding scales and shifts the first one's normalised output.
    Dropout sits between them, where Ho et al. put it."""

    def __init__(self, dim: int, dim_out: int, time_emb_dim: int, groups: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_emb_dim, dim_out * 2))
        self.block1 = Block(dim, dim_out, groups)
        self.dropout = nn.Dropout(dropout)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x: torch.Tensor, time_emb: torch.Tensor) -> torch.Tensor:
        scale_shift = self.mlp(time_emb)[:, :, None, None].chunk(2, dim=1)
        h = self.block1(x, scale_shift)
        h = self.block2(self.dropout(h))
        return h + self.res_conv(x)


class Attention(nn.Module):
    """Full softmax self-attention over all pixels: quadratic in pixels, so only at the bottleneck."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Conv2d(hidden, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w).transpose(-1, -2) for z in self.to_qkv(x).chunk(3, 1))
        out = F.scaled_dot_product_attention(q, k, v)  # (b, heads, hw, d)
        return self.to_out(out.transpose(-1, -2).reshape(b, -1, h, w))


class LinearAttention(nn.Module):
    """Attention linear in the number of pixels (Shen et al. 2018): softmax over features, not positions."""

    def __init__(self, dim: int, heads: int, dim_head: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = dim_head**-0.5
        hidden = heads * dim_head
        self.to_qkv = nn.Conv2d(dim, hidden * 3, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(hidden, dim, 1), nn.GroupNorm(1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        q, k, v = (z.reshape(b, self.heads, -1, h * w) for z in self.to_qkv(x).chunk(3, 1))
        q = q.softmax(dim=-2) * self.scale
        k = k.softmax(dim=-1)
        context = torch.einsum("bhdn,bhen->bhde", k, v)
        out = torch.einsum("bhde,bhdn->bhen", context, q)
        return self.to_out(out.reshape(b, -1, h, w))


class PreNormResidual(nn.Module):
    """x + fn(GroupNorm(x))."""

    def __init__(self, dim: int, fn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, dim)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fn(self.norm(x))


class Downsample(nn.Module):
    """Halve the resolution without discarding pixels: space-to-depth, then a 1x1 conv."""

    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim * 4, dim_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pixel_unshuffle(x, 2))


class Upsample(nn.Module):
    def __init__(self, dim: int, dim_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim_out, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class UNet(nn.Module):
    """eps_theta(x_t, t). Level i works at dim * dim_mults[i] channels; every level but the last halves
    the resolution on the way down and doubles it on the way up, joined by skip connections."""

    def __init__(
        self,
        channels: int,
        dim: int,
        dim_mults: tuple[int, ...] = (1, 2, 4),
        resnet_block_groups: int = 4,
        attn_heads: int = 4,
        attn_dim_head: int = 32,
        dropout: float = 0.0,
        num_classes: int | None = None,
        learn_sigma: bool = False,  # 2C outputs: the objective's, then the variance's v (Nichol & Dhariwal)
    ) -> None:
        super().__init__()
        self.channels = channels
        self.downsample_factor = 2 ** (len(dim_mults) - 1)
        dims = [dim, *(dim * m for m in dim_mults)]
        in_out = list(zip(dims[:-1], dims[1:], strict=True))
        time_dim = dim * 4

        def resnet(d_in: int, d_out: int) -> ResnetBlock:
            return ResnetBlock(d_in, d_out, time_dim, resnet_block_groups, dropout)

        def linear_attn(d: int) -> PreNormResidual:
            return PreNormResidual(d, LinearAttention(d, attn_heads, attn_dim_head))

        self.init_conv = nn.Conv2d(channels, dim, 1)
        self.time_mlp = nn.Sequential(
            SinusoidalPositionEmbeddings(dim),
            nn.Linear(dim, time_dim),
            nn.GELU(),
            nn.Linear(time_dim, time_dim),
        )

        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(in_out):
            last = i == len(in_out) - 1
            down = nn.Conv2d(d_in, d_out, 3, padding=1) if last else Downsample(d_in, d_out)
            self.downs.append(
                nn.ModuleList([resnet(d_in, d_in), resnet(d_in, d_in), linear_attn(d_in), down])
            )

        mid = dims[-1]
        self.mid_block1 = resnet(mid, mid)
        self.mid_attn = PreNormResidual(mid, Attention(mid, attn_heads, attn_dim_head))
        self.mid_block2 = resnet(mid, mid)

        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(in_out)):
            last = i == len(in_out) - 1
            up = nn.Conv2d(d_out, d_in, 3, padding=1) if last else Upsample(d_out, d_in)
            self.ups.append(
                nn.ModuleList(
                    [resnet(d_out + d_in, d_out), resnet(d_out + d_in, d_out), linear_attn(d_out), up]
                )
            )

        self.final_res_block = resnet(dim * 2, dim)
        self.final_conv = nn.Conv2d(dim, channels * (2 if learn_sigma else 1), 1)
        # built last, so the other layers draw the initial weights an unconditional U-Net draws
        self.label_emb = LabelEmbedding(num_classes, time_dim) if num_classes is not None else None

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, labels); an unconditional U-Net ignores ``labels``, so the step and the samplers
        call every network alike; a conditional one reads None as the null label."""
        x = self.init_conv(x)
        r = x
        emb = self.time_mlp(t)
        if self.label_emb is not None:
            emb = self.label_emb(emb, labels)

        skips = []
        for block1, block2, attn, down in self.downs:
            x = block1(x, emb)
            skips.append(x)
            x = attn(block2(x, emb))
            skips.append(x)
            x = down(x)

        x = self.mid_block2(self.mid_attn(self.mid_block1(x, emb)), emb)

        for block1, block2, attn, up in self.ups:
            x = block1(torch.cat([x, skips.pop()], dim=1), emb)
            x = attn(block2(torch.cat([x, skips.pop()], dim=1), emb))
            x = up(x)

        x = self.final_res_block(torch.cat([x, r], dim=1), emb)
        return self.final_conv(x)


def check_unet(cfg: Any, widths: list[int], image_size: int) -> None:
    checks.at_least("model.attn_heads", cfg.attn_heads, 1)
    checks.at_least("model.attn_dim_head", cfg.attn_dim_head, 1)
    groups = cfg.resnet_block_groups
    checks.at_least("model.resnet_block_groups", groups, 1)
    if any(w % groups for w in widths):
        raise ConfigError(
            f"model.resnet_block_groups={groups} is invalid: it must divide every block width {widths}"
        )


def build_unet(
    cfg: Any, channels: int, image_size: int, num_classes: int | None = None, learn_sigma: bool = False
) -> UNet:
    return UNet(
        channels=channels,
        dim=cfg.dim,
        dim_mults=tuple(cfg.dim_mults),
        resnet_block_groups=cfg.resnet_block_groups,
        attn_heads=cfg.attn_heads,
        attn_dim_head=cfg.attn_dim_head,
        dropout=cfg.dropout,
        num_classes=num_classes,
        learn_sigma=learn_sigma,
    )


UNET = Option("unet", UNetConfig, build_unet, check_unet)
