"""Images from a trained model: ``generate`` draws n of them in batches with one seeded generator,
through any sampler of sampling.py, each given its label where the model is conditional;
``generate_with_frames`` also keeps the states on the way (the samplers' ``on_step``)."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch

from ddpm.diffusion.sampling import SAMPLERS, OnStep, SamplingOptions, sampling_timesteps

if TYPE_CHECKING:
    from ddpm.trained import TrainedModel


@torch.no_grad()
def generate(
    trained: TrainedModel,
    sampling: SamplingOptions,
    n: int,
    seed: int,
    batch_size: int,
    labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """n images in [-1, 1] of the trained model's shape, drawn ``batch_size`` at a time on its device;
    image i given ``labels[i]`` where the network is conditional.

    One generator, seeded once, supplies x_T and every step's noise: the same seed, n and batch size give
    the same images."""
    return _draw(trained, sampling, n, seed, batch_size, frames=0, labels=labels)[0]


@torch.no_grad()
def generate_with_frames(
    trained: TrainedModel,
    sampling: SamplingOptions,
    n: int,
    seed: int,
    batch_size: int,
    frames: int,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``generate``'s images (the very same), and ``frames`` states of the way to them, (frames, n, C, H,
    W) on the CPU, clipped to [-1, 1]: x_T first, the images last, evenly spaced over the visited
    timesteps in between (at most one frame per step: frames is clamped to steps + 1)."""
    images, states = _draw(trained, sampling, n, seed, batch_size, frames, labels)
    assert states is not None
    return images, states


def frame_steps(steps: int, frames: int) -> list[int]:
    """Which states of a sampler's run of ``steps`` steps (0: x_T, ``steps``: the images) make
    ``frames`` frames, evenly spaced with both ends included."""
    frames = min(max(frames, 2), steps + 1)
    return sorted({round(i * steps / (frames - 1)) for i in range(frames)})


def _recorder(keep: set[int], into: list[torch.Tensor]) -> OnStep:
    def record(i: int, x: torch.Tensor) -> None:
        if i in keep:
            into.append(x.clamp(-1.0, 1.0).cpu())

    return record


def _draw(
    trained: TrainedModel,
    sampling: SamplingOptions,
    n: int,
    seed: int,
    batch_size: int,
    frames: int,
    labels: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The images, and with ``frames`` > 0 the states that ``frame_steps`` chooses (None without)."""
    network, schedule = trained.network, trained.diffusion.schedule
    device = schedule.betas.device
    if labels is not None and labels.shape != (n,):
        raise ValueError(f"{n} images need {n} labels, not a tensor of shape {tuple(labels.shape)}")
    was_training = network.training
    network.eval()
    timesteps = sampling_timesteps(
        schedule.timesteps, sampling.steps(schedule.timesteps), sampling.timestep_spacing
    )
    sampler = SAMPLERS[sampling.sampler]
    # auto becomes the model's own variance; learned on a fixed-variance model is refused
    sampling = replace(sampling, ddpm_variance=trained.diffusion.resolve_variance(sampling.ddpm_variance))
    options = sampler.options(sampling)
    keep = set(frame_steps(len(timesteps), frames)) if frames > 0 else set()
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks, frame_chunks = [], []
    for start in range(0, n, batch_size):
        b = min(batch_size, n - start)
        chunk_labels = labels[start : start + b].to(device) if labels is not None else None
        denoise = trained.denoiser(sampling.clip_x0, chunk_labels, sampling.guidance_scale)
        x_T = torch.randn((b, *trained.shape), generator=generator, device=device)
        kept = [x_T.clamp(-1.0, 1.0).cpu()] if 0 in keep else []
        on_step = _recorder(keep, kept) if keep else None
        chunks.append(
            sampler.run(denoise, schedule, x_T, timesteps, generator, **options, on_step=on_step).cpu()
        )
        frame_chunks.append(kept)
    network.train(was_training)
    states = torch.cat([torch.stack(k) for k in frame_chunks], dim=1) if keep else None
    return torch.cat(chunks), states
