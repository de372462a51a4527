"""diffusers DDPM pipeline folders, read and written without diffusers: ``model_index.json``,
``unet/config.json`` with ``unet/diffusion_pytorch_model.safetensors`` (or an older ``.bin``), and
``scheduler/scheduler_config.json``. Read, a folder becomes the payload a ddpm checkpoint loads as
(checkpoint.load_checkpoint's), so everything that samples or scores a checkpoint takes one.

A folder ddpm writes also holds ``ddpm.json``: the run's config, step and class names, which diffusers
ignores and which make the folder read back as the run it came from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from ddpm.checkpoint import FORMAT, VERSION, load_checkpoint, safe_torch_load, weights_in
from ddpm.errors import CheckpointError, ConfigError
from ddpm.files import fsync_dir, write_atomically
from ddpm.interop.scheduler import run_keys_from_scheduler, scheduler_from_run
from ddpm.interop.unet2d import (
    DIFFUSERS_VERSION,
    from_diffusers,
    ho_from_unet2d,
    to_diffusers,
    unet2d_from_ho,
)

WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
OWN = "ddpm.json"  # ddpm's record of the run, beside what diffusers reads
OWN_FORMAT = "ddpm-pipeline"


def load_source(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict[str, Any]:
    """The payload of a ddpm checkpoint, its .safetensors export or a diffusers pipeline folder; ``mmap``
    maps a checkpoint's tensors instead of reading them (load_checkpoint's)."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        return load_checkpoint(path, key, mmap=mmap)
    if not is_pipeline(folder):
        raise CheckpointError(f"{key}={path} is a folder, but not a diffusers pipeline (no model_index.json)")
    return read_pipeline(folder, key)


def is_pipeline(path: str | Path) -> bool:
    """Whether ``path`` names a folder to be read as a diffusers pipeline (it may still be a bad one)."""
    path = Path(path).expanduser()
    return path.is_dir() and ((path / "model_index.json").is_file() or (path / "unet").is_dir())


def read_json(root: Path, name: str, where: str) -> dict[str, Any]:
    path = root / name
    if not path.is_file():
        raise CheckpointError(f"{where} is not a diffusers pipeline: it has no {name}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: {path.name} is not readable JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: {path.name} is not a JSON object")
    return data


def read_pipeline(path: str | Path, key: str = "ckpt") -> dict[str, Any]:
    """A diffusers DDPM pipeline folder as a ddpm checkpoint payload (one set of weights, fp32)."""
    root = Path(path).expanduser()
    where = f"{key}={path}"
    index = read_json(root, "model_index.json", where)
    for part, wanted in (("unet", "UNet2DModel"), ("scheduler", None)):
        entry = index.get(part)
        if not isinstance(entry, list) or len(entry) != 2:
            raise CheckpointError(f"{where} is not a DDPM pipeline: model_index.json has no {part}")
        if wanted is not None and entry[1] != wanted:
            raise CheckpointError(
                f"{where}'s {part} is a {entry[1]}, not a {wanted}: ddpm reads Ho et al.'s U-Net"
            )
    unet = read_json(root, "unet/config.json", where)
    layout = ho_from_unet2d(unet, where)
    run = run_keys_from_scheduler(read_json(root, "scheduler/scheduler_config.json", where), where)
    channels, out_channels = layout["channels"], layout["out_channels"]
    if out_channels != channels * (2 if run["learn_sigma"] else 1):
        variance = "learned_range" if run["learn_sigma"] else "a fixed variance"
        raise CheckpointError(
            f"{where}'s U-Net has {out_channels} output channels for {channels} input channels with "
            f"{variance}: ddpm needs {channels * (2 if run['learn_sigma'] else 1)}"
        )
    state = from_diffusers(load_weights(root / "unet", where), where)
    own = read_json(root, OWN, where) if (root / OWN).is_file() else None
    if own is not None and own.get("format") == OWN_FORMAT:
        # written by ddpm-export: the run's own config (its data, loss, ...) and class names
        payload = {"format": FORMAT, "version": VERSION, "step": int(own["step"]), "config": own["config"]}
        payload[own.get("weights", "model")] = state
        if own.get("class_names") is not None:
            payload["class_names"] = own["class_names"]
        return payload
    classes = layout["num_class_embeds"]
    if classes is not None:
        # a label embedding trained without ddpm's null label: a zero row stands in for it, which guidance
        # (refused for a model trained without dropped labels) never reads
        weight = state["label_emb.embed.weight"]
        state["label_emb.embed.weight"] = torch.cat([weight, weight.new_zeros(1, weight.shape[1])])
    config = {
        "model": layout["model"],
        "data": {"name": "diffusers", "channels": channels, "image_size": layout["image_size"]},
        "loss": "l2",
        "class_cond": classes is not None,
        "cond_drop_prob": 0.0,
        **run,
    }
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": 0,
        "config": config,
        "model": state,
        "source": "diffusers",
    }
    if classes is not None:
        payload["class_names"] = [str(i) for i in range(classes)]
    return payload


def load_weights(folder: Path, where: str) -> dict[str, torch.Tensor]:
    """unet/diffusion_pytorch_model.safetensors, else the .bin (read as a checkpoint is: no code runs)."""
    safetensors, bin_file = (folder / name for name in WEIGHTS)
    if safetensors.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(safetensors))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(
                f"{where}: {safetensors.name} is not a readable .safetensors file: {e}"
            ) from e
    if bin_file.is_file():
        state = safe_torch_load(bin_file, f"{where}'s unet/{bin_file.name}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{where}: {bin_file.name} is not a state dict of tensors")
        return state
    raise CheckpointError(f"{where} is not a diffusers pipeline: unet/ has neither {' nor '.join(WEIGHTS)}")


# ------------------------------------------------------------------------------------------ writing
def check_exportable(payload: dict[str, Any], where: str) -> None:
    """What makes a checkpoint exportable as a UNet2DModel, checked before anything is written."""
    model = payload["config"]["model"]
    if model["name"] != "ho2020":
        raise ConfigError(
            f"format=diffusers needs model=ho2020 (Ho et al.'s U-Net, which UNet2DModel is); {where} is "
            f"model={model['name']}, whose linear attention UNet2DModel has no equivalent"
        )
    if model["dim_mults"][0] != 1:
        raise ConfigError(
            f"format=diffusers: {where} has model.dim_mults={list(model['dim_mults'])}; UNet2DModel's first "
            "level has conv_in's width, so dim_mults must start with 1"
        )


def write_pipeline(payload: dict[str, Any], out: Path, ema: bool = True) -> str:
    """Write ``payload`` (a checkpoint's) as a DDPMPipeline folder at ``out``, all at once: into a
    temporary folder beside it, renamed into place. Returns which weights were written."""
    config = payload["config"]
    weights = weights_in(payload, ema)
    state = dict(payload[weights])
    names = payload.get("class_names")
    data = config["data"]
    channels, size = int(data["channels"]), int(data["image_size"])
    learn_sigma = bool(config.get("learn_sigma", False))
    unet = unet2d_from_ho(
        config["model"],
        channels,
        size,
        channels * (2 if learn_sigma else 1),
        len(names) + 1 if names is not None else None,  # ddpm's null label is the last row
    )
    files = {
        "model_index.json": {
            "_class_name": "DDPMPipeline",
            "_diffusers_version": DIFFUSERS_VERSION,
            "scheduler": ["diffusers", "DDPMScheduler"],
            "unet": ["diffusers", "UNet2DModel"],
        },
        "unet/config.json": unet,
        "scheduler/scheduler_config.json": scheduler_from_run(config),
        OWN: {
            "format": OWN_FORMAT,
            "step": payload["step"],
            "weights": weights,
            "config": config,
            "class_names": names,
        },
    }
    from safetensors.torch import save

    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / "unet").mkdir(parents=True)
        (tmp / "scheduler").mkdir()
        for name, content in files.items():
            text = json.dumps(content, indent=2) + "\n"
            write_atomically(tmp / name, lambda f, text=text: f.write(text.encode()))
        blob = save(to_diffusers(state), metadata={"format": "pt"})
        write_atomically(tmp / "unet" / WEIGHTS[0], lambda f: f.write(blob))
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return weights
