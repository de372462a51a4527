"""Checkpoints: the weights plus the resolved config that rebuilds model, schedule and image shape.

Files are written atomically (temporary file, fsync, rename) and read with ``weights_only=True``, so a
crash never leaves half a checkpoint and loading one never runs code. A checkpoint written by ddpm-train
also carries the training state (``state``: optimizer, LR schedule, RNG states, data position) that
``resume`` continues from; see training/rundir/state.py. trained.py rebuilds a model from one.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ddpm.errors import CheckpointError
from ddpm.files import fsync_dir, write_atomically

FORMAT = "ddpm-checkpoint"
VERSION = 2  # 2 added the training state; version 1 files still load for sampling
READABLE_VERSIONS = (1, 2)
WEIGHTS_FORMAT = "ddpm-weights"  # the metadata marker of a .safetensors export


def save_checkpoint(
    path: Path,
    *,
    step: int,
    model: dict[str, torch.Tensor],
    config: dict[str, Any],
    ema: dict[str, torch.Tensor] | None = None,
    state: dict[str, Any] | None = None,
    class_names: Sequence[str] | None = None,
) -> None:
    """Write atomically (files.write_atomically): a failure leaves an earlier file at ``path`` whole.
    ``class_names``: a class-conditional model's, label i naming class_names[i]."""
    payload = {"format": FORMAT, "version": VERSION, "step": step, "model": model, "config": config}
    if class_names is not None:
        payload["class_names"] = list(class_names)
    if ema is not None:
        payload["ema"] = ema
    if state is not None:
        payload["state"] = state
    write_atomically(path, lambda f: torch.save(payload, f))


def link_checkpoint(src: Path, dst: Path) -> None:
    """Make ``dst`` the same checkpoint as ``src`` atomically: a hard link where possible, else a copy."""
    tmp = dst.with_name(f".{dst.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dst.parent)


def output_base(ckpt: Path) -> tuple[Path, str]:
    """Where a command's default output for ``ckpt`` goes, and the name it is filed under: beside the run
    that wrote a checkpoint (its stem), or in the current directory for a pipeline folder (its name),
    whose parent is nobody's run."""
    if ckpt.is_dir():
        return Path("."), ckpt.resolve().name
    return run_dir_of(ckpt), ckpt.stem


def run_dir_of(ckpt: Path) -> Path:
    """The run directory that wrote ``ckpt`` (<run>/checkpoints/x.pt), or the checkpoint's own folder."""
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def weights_in(payload: dict[str, Any], ema: bool = True) -> str:
    """Which set of a payload's weights to use: the EMA's where ``ema`` asks and the file has them, and
    otherwise the raw ones, unless the file holds only one set (an export), which is then the one."""
    return "ema" if (ema and "ema" in payload) or "model" not in payload else "model"


def export_safetensors(payload: dict[str, Any], path: Path, ema: bool = True) -> str:
    """Write one set of weights (EMA where the checkpoint has it and ``ema``) and the config as a
    .safetensors file: no pickle at all, so anyone can load it safely; ddpm-sample reads it as it reads a
    checkpoint. Returns which weights were written."""
    from safetensors.torch import save

    weights = weights_in(payload, ema)
    metadata = {
        "format": WEIGHTS_FORMAT,
        "step": str(payload["step"]),
        "weights": weights,
        "config": json.dumps(payload["config"]),
    }
    if payload.get("class_names") is not None:
        metadata["class_names"] = json.dumps(payload["class_names"])
    # safetensors' own save_file would make the file 0600; written here, it gets the usual permissions
    data = save({k: v.contiguous() for k, v in payload[weights].items()}, metadata=metadata)
    write_atomically(path, lambda f: f.write(data))
    return weights


def _load_safetensors(path: Path, key: str) -> dict[str, Any]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{key}={path} is not a readable .safetensors file: {e}") from e
    if metadata.get("format") != WEIGHTS_FORMAT:
        raise CheckpointError(
            f"{key}={path} holds weights, but not a ddpm export (no '{WEIGHTS_FORMAT}' marker)"
        )
    weights = metadata.get("weights", "model")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "step": int(metadata.get("step", 0)),
        "config": json.loads(metadata["config"]),
        weights: tensors,
    }
    if "class_names" in metadata:
        payload["class_names"] = json.loads(metadata["class_names"])
    return payload


def safe_torch_load(path: Path, where: str, mmap: bool = False) -> Any:
    """torch.load with weights_only=True: a file whose pickle would call code is refused, naming what it
    asks for; ``where`` names the file in the one-line error."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        # The safe unpickler names the callable a crafted file asks for ("GLOBAL posix.system").
        wanted = re.search(r"GLOBAL ([\w.]+)|[Uu]nsupported global: GLOBAL ([\w.]+)", str(e))
        if wanted is None:
            raise CheckpointError(
                f"{where} is not a readable checkpoint (truncated, or another format)"
            ) from e
        raise CheckpointError(
            f"{where} was refused: loading it would call {wanted.group(1) or wanted.group(2)}, "
            "which a checkpoint of weights never needs"
        ) from e
    except Exception as e:  # the unpickler fails in many ways on a file that is not a checkpoint
        raise CheckpointError(f"{where} is not a readable checkpoint (truncated, or another format)") from e


def load_checkpoint(path: str | Path, key: str = "ckpt", mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint of this tool (or its .safetensors export) to the CPU; CheckpointError (one line,
    naming the config ``key`` that gave the path) for anything else. ``mmap`` maps the tensors instead of
    reading them. (interop.pipeline.load_source also reads diffusers pipeline folders.)"""
    path = Path(path).expanduser()
    if path.is_dir():
        raise CheckpointError(f"{key}={path} is a folder, not a checkpoint file")
    if not path.is_file():
        raise CheckpointError(f"{key}={path} does not exist")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, key)
    payload = safe_torch_load(path, f"{key}={path}", mmap)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{key}={path} is not a ddpm checkpoint (no '{FORMAT}' marker)")
    if payload.get("version") not in READABLE_VERSIONS:
        version = payload.get("version")
        readable = ", ".join(map(str, READABLE_VERSIONS))
        raise CheckpointError(
            f"{key}={path} has format version {version}; this ddpm reads versions {readable}"
        )
    return payload
