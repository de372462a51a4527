"""ddpm-sample: draw images from a checkpoint alone and write them as a grid, one file each and the
denoising GIF, every check run before anything is written; and say what was drawn, with what."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ddpm.checkpoint import output_base
from ddpm.conditioning import check_guidance, sample_labels
from ddpm.diffusion.generate import generate, generate_with_frames
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.errors import ConfigError
from ddpm.images import save_gif, save_grid, save_individual
from ddpm.runtime import Runtime
from ddpm.trained import load_trained
from ddpm.validate import validate_sample


def sample(cfg: DictConfig) -> None:
    """Draw cfg.n images (null: 64, or 8 of each class drawn) from the checkpoint cfg.ckpt; every check runs
    before anything is written."""
    validate_sample(cfg)
    trained = load_trained(cfg.ckpt, Runtime.from_config(cfg).device, ema=cfg.ema)
    check_guidance(trained, cfg.guidance_scale)
    variance = trained.diffusion.resolve_variance(cfg.ddpm_variance)  # learned on a fixed model: refused
    labels, ncol, n = sample_labels(trained, cfg.labels, cfg.n)
    out = Path(cfg.out) if cfg.out is not None else default_out(Path(cfg.ckpt), cfg.seed)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={cfg.out} cannot be written: {e.strerror or e}") from e
    sampling = SamplingOptions.from_config(cfg)
    if cfg.gif:
        images, frames = generate_with_frames(
            trained, sampling, n, cfg.seed, cfg.batch_size, cfg.gif_frames, labels
        )
    else:
        images = generate(trained, sampling, n, cfg.seed, cfg.batch_size, labels)
    try:
        save_grid(images, out / "grid.png", ncol)
        if cfg.save_images:
            save_individual(images, out / "images")
        if cfg.gif:
            save_gif(frames, out / "denoise.gif", cfg.gif_frame_ms)
    except OSError as e:
        raise ConfigError(f"out={out} cannot be written: {e.strerror or e}") from e
    where = f"{out / 'grid.png'}" + (f" and {n} images in {out / 'images'}" if cfg.save_images else "")
    if cfg.gif:
        where += f" and {out / 'denoise.gif'} ({len(frames)} frames)"
    weights = {"ema": "EMA weights", "model": "raw weights"}[trained.weights]
    if trained.source == "diffusers":
        weights = "the pipeline's weights"  # one set: whether they are an EMA, the folder does not say
    elif cfg.ema and trained.weights == "model":
        weights += " (the checkpoint has no EMA)"
    steps = sampling.steps(trained.diffusion.timesteps)
    asked = ""
    if labels is not None:
        names = [trained.class_names[i] for i in labels.unique_consecutive().tolist()]
        shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
        asked = f"{ncol} each of {shown}, guidance {trained.guidance(cfg.guidance_scale):g}, "
    drawn = f"{cfg.sampler} with {steps} steps"
    if cfg.sampler == "ddpm":  # the other samplers read only the mean
        drawn += f", {variance.value} variance"
    print(
        f"ddpm-sample: {n} samples from {cfg.ckpt} (step {trained.step}, {weights}, {asked}{drawn}) "
        f"-> {where}"
    )


def default_out(ckpt: Path, seed: int) -> Path:
    """<run>/generated/<checkpoint>_seed<seed>, beside the run that wrote the checkpoint (for a pipeline
    folder: ./generated/<folder>_seed<seed>)."""
    base, name = output_base(ckpt)
    return base / "generated" / f"{name}_seed{seed}"
