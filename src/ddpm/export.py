"""ddpm-export: one set of a checkpoint's weights, with its config, as a .safetensors file (ddpm's own
format, no pickle) or as a diffusers DDPMPipeline folder; every check runs before anything is written."""

from __future__ import annotations

from enum import Enum
from pathlib import Path

from omegaconf import DictConfig

from ddpm.checkpoint import export_safetensors
from ddpm.errors import ConfigError
from ddpm.interop.pipeline import check_exportable, load_source, write_pipeline


class ExportFormat(Enum):
    safetensors = "safetensors"  # ddpm's: the weights and the run's config, read by every ddpm command
    diffusers = "diffusers"  # a folder DDPMPipeline.from_pretrained loads (and every ddpm command)


def default_out(ckpt: Path, fmt: ExportFormat) -> Path:
    """Beside the checkpoint: <checkpoint>.safetensors, or the folder <checkpoint>_diffusers."""
    if fmt is ExportFormat.safetensors:
        return ckpt.with_suffix(".safetensors")
    return ckpt.with_name(f"{ckpt.stem}_diffusers")


def export(cfg: DictConfig) -> None:
    ckpt = Path(cfg.ckpt)
    fmt = ExportFormat(cfg.format)
    out = Path(cfg.out) if cfg.out is not None else default_out(ckpt, fmt)
    if fmt is ExportFormat.safetensors and out.suffix != ".safetensors":
        raise ConfigError(f"out={cfg.out} is invalid: give a file name ending in .safetensors")
    if fmt is ExportFormat.diffusers and out.exists():
        raise ConfigError(
            f"out={out} exists: format=diffusers writes a new folder; name one that is not there"
        )
    payload = load_source(ckpt)
    if fmt is ExportFormat.diffusers:
        check_exportable(payload, f"ckpt={ckpt}")
    try:
        if fmt is ExportFormat.safetensors:
            weights = export_safetensors(payload, out, ema=cfg.ema)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            weights = write_pipeline(payload, out, ema=cfg.ema)
    except OSError as e:
        raise ConfigError(f"out={out} cannot be written: {e.strerror or e}") from e
    kind = {"ema": "EMA weights", "model": "raw weights"}[weights]
    what = "and its config" if fmt is ExportFormat.safetensors else "as a diffusers DDPMPipeline"
    note = ""
    if fmt is ExportFormat.diffusers and payload.get("class_names") is not None:
        n = len(payload["class_names"])
        note = (
            f" (class-conditional: DDPMPipeline passes no labels; call its UNet2DModel with class_labels "
            f"0-{n - 1}, {n} the null label)"
        )
    print(f"ddpm-export: {kind} of {ckpt} (step {payload['step']}) {what} -> {out}{note}")
