"""Ho et al.'s U-Net (``model=ho2020``) as diffusers' UNet2DModel describes it: its config.json and its
weight names, both ways. The layouts are the same network (diffusers' conversion of the original weights
is the ``original`` variant); only the names and the attention's projections (one 1x1 conv of 3C here,
three C x C linear maps there) differ. Plain dicts and tensors: diffusers is not imported.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ddpm.errors import CheckpointError
from ddpm.models.unet_ho import GROUPS, LEGACY, VARIANTS

DIFFUSERS_VERSION = "0.30.0"  # the oldest release the tests load these folders with

# UNet2DModel's defaults for the keys whose value ho2020 fixes, and the value it needs
FIXED = {
    "act_fn": ("silu", "silu"),
    "time_embedding_type": ("positional", "positional"),
    "flip_sin_to_cos": (True, False),
    "freq_shift": (0, 1),
    "center_input_sample": (False, False),
    "norm_num_groups": (32, GROUPS),
    "mid_block_type": ("UNetMidBlock2D", "UNetMidBlock2D"),
    "mid_block_scale_factor": (1, 1),
    "resnet_time_scale_shift": ("default", "default"),
    "add_attention": (True, True),
    "class_embed_type": (None, None),
    "downsample_type": ("conv", "conv"),
    "upsample_type": ("conv", "conv"),
    "attn_norm_num_groups": (None, None),
    "num_train_timesteps": (None, None),
}
WHAT = {  # what ho2020 has, for the message naming a difference
    "act_fn": "SiLU",
    "flip_sin_to_cos": "the sines before the cosines",
    "freq_shift": "frequencies exp(-ln(10000) i / (half - 1))",
    "norm_num_groups": f"{GROUPS} groups",
    "mid_block_scale_factor": "no output scale",
    "attn_norm_num_groups": "the blocks' GroupNorm in the attention",
    "num_train_timesteps": "a sinusoidal time embedding",
}
VARIANT_OF = {(v.norm_eps, 0 if v.same_padding else 1): name for name, v in VARIANTS.items()}


def layout_error(where: str, difference: str) -> CheckpointError:
    return CheckpointError(f"{where} has a layout model=ho2020 cannot express: {difference}")


# ------------------------------------------------------------------------------------------ the config
def ho_from_unet2d(config: dict[str, Any], where: str) -> dict[str, Any]:
    """ddpm's view of a UNet2DModel config: ``model`` (the ho2020 config entry), ``channels``,
    ``image_size``, ``num_class_embeds`` (None: unconditional) and ``out_channels``. A layout ho2020
    cannot build raises one line naming the first difference."""
    if config.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise CheckpointError(f"{where}'s network is a {config['_class_name']}, not a UNet2DModel")
    for key, (default, needed) in FIXED.items():
        value = config.get(key, default)
        if value != needed:
            raise layout_error(where, f"{key} {value}: ho2020 has {WHAT.get(key, needed)}")
    widths = list(config.get("block_out_channels", (64, 128, 256, 512)))
    down = list(config.get("down_block_types", ()))
    up = list(config.get("up_block_types", ()))
    if not widths or len(down) != len(widths) or len(up) != len(widths):
        raise layout_error(where, f"{len(down)} down and {len(up)} up blocks for {len(widths)} widths")
    ch = widths[0]
    if any(w % ch for w in widths):
        raise layout_error(where, f"block_out_channels {widths}: ho2020's widths are multiples of the first")
    size = config.get("sample_size", 64)
    if isinstance(size, list | tuple):
        if len(set(size)) != 1:
            raise layout_error(where, f"sample_size {list(size)}: ho2020 makes square images")
        size = size[0]
    levels = len(widths)
    attn_down = [_block_kind(t, "Down", where) for t in down]
    attn_up = [_block_kind(t, "Up", where) for t in reversed(up)]  # up_blocks run from the deepest level
    if attn_down != attn_up:
        level = next(i for i in range(levels) if attn_down[i] != attn_up[i])
        has = "down" if attn_down[level] else "up"
        raise layout_error(
            where, f"attention at {size >> level}x{size >> level} on the {has} path only: ho2020 has both"
        )
    head_dim = config.get("attention_head_dim", 8)
    attn_widths = [w for w, a in zip(widths, attn_down, strict=True) if a] + [widths[-1]]
    if head_dim is not None and any(head_dim != w for w in attn_widths):
        raise layout_error(where, f"attention head dim {head_dim}: ho2020 uses one head")
    eps, padding = float(config.get("norm_eps", 1e-5)), int(config.get("downsample_padding", 1))
    variant = VARIANT_OF.get((eps, padding))
    if variant is None:
        known = ", ".join(f"norm_eps {e:g} with downsample_padding {p}" for e, p in VARIANT_OF)
        raise layout_error(where, f"norm_eps {eps:g} with downsample_padding {padding}: ho2020 has {known}")
    model = {
        "name": "ho2020",
        "dim": ch,
        "dim_mults": [w // ch for w in widths],
        "num_res_blocks": int(config.get("layers_per_block", 2)),
        "attn_resolutions": [size >> i for i in range(levels) if attn_down[i]],
        "dropout": float(config.get("dropout", 0.0)),
        "variant": variant,
    }
    return {
        "model": model,
        "channels": int(config.get("in_channels", 3)),
        "image_size": int(size),
        "num_class_embeds": config.get("num_class_embeds"),
        "out_channels": int(config.get("out_channels", 3)),
    }


def _block_kind(name: str, path: str, where: str) -> bool:
    """Whether a down or up block type has attention; any other block type is refused."""
    if name == f"{path}Block2D":
        return False
    if name == f"Attn{path}Block2D":
        return True
    kinds = f"{path}Block2D and Attn{path}Block2D"
    raise layout_error(where, f"{path.lower()} block type {name}: ho2020 has {kinds}")


def unet2d_from_ho(
    model: dict[str, Any], channels: int, image_size: int, out_channels: int, num_class_embeds: int | None
) -> dict[str, Any]:
    """The UNet2DModel config.json of an ho2020 config entry; ``model.dim_mults[0]`` must be 1 (the first
    block has conv_in's width there), which the caller checks."""
    ch, mults = model["dim"], list(model["dim_mults"])
    attn = [image_size >> i in model["attn_resolutions"] for i in range(len(mults))]
    variant = VARIANTS[model.get("variant", LEGACY)]
    return {
        "_class_name": "UNet2DModel",
        "_diffusers_version": DIFFUSERS_VERSION,
        "sample_size": image_size,
        "in_channels": channels,
        "out_channels": out_channels,
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 1,
        "flip_sin_to_cos": False,
        "down_block_types": ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        "up_block_types": ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        "block_out_channels": [ch * m for m in mults],
        "layers_per_block": model["num_res_blocks"],
        "mid_block_scale_factor": 1,
        "downsample_padding": 0 if variant.same_padding else 1,
        "downsample_type": "conv",
        "upsample_type": "conv",
        "dropout": model["dropout"],
        "act_fn": "silu",
        "attention_head_dim": None,
        "norm_num_groups": GROUPS,
        "attn_norm_num_groups": None,
        "norm_eps": variant.norm_eps,
        "resnet_time_scale_shift": "default",
        "add_attention": True,
        "class_embed_type": None,
        "num_class_embeds": num_class_embeds,
        "num_train_timesteps": None,
    }


# ------------------------------------------------------------------------------------- the weight names
# ours -> theirs: a residual block's layers and the older attention names
RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "temb": "time_emb_proj",
    "norm2": "norm2",
    "conv2": "conv2",
    "skip": "conv_shortcut",
}
OLD_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
# ours <-> theirs, the prefix of every other weight's name, in both directions ({...}: the part kept)
LAYOUT = [
    ("time_mlp.1.", "time_embedding.linear_1."),
    ("time_mlp.3.", "time_embedding.linear_2."),
    ("label_emb.embed.", "class_embedding."),
    ("norm_out.", "conv_norm_out."),
    ("{conv}.", "{conv}."),
    ("{level}.{i}.blocks.{j}.", "{level}_blocks.{i}.resnets.{j}."),
    ("{level}.{i}.attns.{j}.", "{level}_blocks.{i}.attentions.{j}."),
    ("downsample.{i}.", "down_blocks.{i}.downsamplers.0.conv."),
    ("upsample.{i}.", "up_blocks.{i}.upsamplers.0.conv."),
    ("mid1.", "mid_block.resnets.0."),
    ("mid_attn.", "mid_block.attentions.0."),
    ("mid2.", "mid_block.resnets.1."),
]
PARTS = {"conv": "conv_in|conv_out", "level": "down|up", "i": r"\d+", "j": r"\d+"}


def _prefix_pattern(template: str) -> re.Pattern[str]:
    pieces = re.split(r"\{(\w+)\}", template)  # literal, name, literal, name, ...
    regex = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{PARTS[p]})" for k, p in enumerate(pieces))
    return re.compile(regex)


PREFIXES = [(_prefix_pattern(ours), theirs) for ours, theirs in LAYOUT]
UNPREFIXES = [(_prefix_pattern(theirs), ours) for ours, theirs in LAYOUT]


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An HoUNet state dict under UNet2DModel's (current) names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        new = _rename(name, PREFIXES)
        if ".resnets." in new:
            base, layer, param = new.rsplit(".", 2)
            new = f"{base}.{RESNET[layer]}.{param}"
        if ".attentions." in new:
            base, layer, param = new.rsplit(".", 2)
            if layer == "qkv":
                for part, piece in zip(("to_q", "to_k", "to_v"), tensor.chunk(3, 0), strict=True):
                    out[f"{base}.{part}.{param}"] = piece.flatten(1) if param == "weight" else piece
                continue
            layer = {"norm": "group_norm", "out": "to_out.0"}[layer]
            tensor = tensor.flatten(1) if layer == "to_out.0" and param == "weight" else tensor
            new = f"{base}.{layer}.{param}"
        out[new] = tensor.contiguous()
    return out


def from_diffusers(state: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """A UNet2DModel state dict (the current attention names, or the older query / key / value /
    proj_attn) under HoUNet's names; a name it does not know raises one line."""
    theirs = {RESNET[k]: k for k in RESNET}
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        for old, new in OLD_ATTENTION.items():
            name = re.sub(rf"\.attentions\.(\d+)\.{old}\.", rf".attentions.\1.{new}.", name)
        tensor = tensor.float()
        m = re.fullmatch(r"(.*\.attentions\.\d+)\.(group_norm|to_q|to_k|to_v|to_out\.0)\.(weight|bias)", name)
        if m:
            base, layer, param = m.groups()
            if layer in ("to_q", "to_k", "to_v"):
                qkv.setdefault(f"{base}.qkv.{param}", {})[layer] = tensor
                continue
            if layer == "to_out.0" and param == "weight":
                tensor = tensor[:, :, None, None]
            name = f"{base}.{'norm' if layer == 'group_norm' else 'out'}.{param}"
        m = re.fullmatch(r"(.*\.resnets\.\d+)\.(\w+)\.(weight|bias)", name)
        if m and m.group(2) in theirs:
            name = f"{m.group(1)}.{theirs[m.group(2)]}.{m.group(3)}"
        out[_unrename(name, where)] = tensor
    for name, parts in qkv.items():
        if set(parts) != {"to_q", "to_k", "to_v"}:
            missing = sorted({"to_q", "to_k", "to_v"} - set(parts))
            raise CheckpointError(f"{where}'s attention {name} lacks {', '.join(missing)}")
        stacked = torch.cat([parts["to_q"], parts["to_k"], parts["to_v"]], 0)
        out[_unrename(name, where)] = stacked[:, :, None, None] if name.endswith("weight") else stacked
    return out


def _rename(name: str, rules: list[tuple[re.Pattern[str], str]]) -> str:
    for pattern, replacement in rules:
        m = pattern.match(name)
        if m:
            return replacement.format(**m.groupdict()) + name[m.end() :]
    raise KeyError(name)


def _unrename(name: str, where: str) -> str:
    try:
        return _rename(name, UNPREFIXES)
    except KeyError:
        raise CheckpointError(f"{where} has a weight ho2020 does not: {name}") from None
