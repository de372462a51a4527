"""Writing images: sample grids, single samples, the denoising animation and the forward-process figure."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torchvision.utils import make_grid

from ddpm.diffusion.gaussian import Diffusion
from ddpm.files import write_atomically

# Cells of a grid are enlarged (nearest neighbour, whole factors) to at least this many pixels, so 8x8 or
# 28x28 samples can be seen; single-image PNGs keep the model's resolution.
DISPLAY_MIN_PX = 32
# The last frame of an animation stays this long (or 5 frames, if longer), so the result can be seen.
HOLD_LAST_MS = 2000


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C, H, W) in [-1, 1] -> an 8-bit PIL image, grayscale for one channel."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if pixels.shape[0] == 1:
        return Image.fromarray(pixels[0].numpy(), mode="L")
    return Image.fromarray(pixels.permute(1, 2, 0).numpy(), mode="RGB")


def save_png(image: Image.Image, path: Path) -> None:
    """Written atomically, so a reader never sees half a file."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))


def display_scale(size: int) -> int:
    return max(1, math.ceil(DISPLAY_MIN_PX / size))


def grid_image(images: torch.Tensor, ncol: int | None = None) -> Image.Image:
    """A square-ish grid of (N, C, H, W) images in [-1, 1], cells enlarged to DISPLAY_MIN_PX."""
    n, _, h, _ = images.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    scale = display_scale(h)
    if scale > 1:
        images = torch.nn.functional.interpolate(images.float(), scale_factor=scale, mode="nearest")
    grid = make_grid(images.float().cpu(), nrow=ncol, padding=2, pad_value=1.0)
    return to_pil(grid[:1] if images.shape[1] == 1 else grid)


def save_grid(images: torch.Tensor, path: Path, ncol: int | None = None) -> None:
    save_png(grid_image(images, ncol), path)


def save_gif(frames: torch.Tensor, path: Path, frame_ms: int) -> None:
    """An animated GIF of (F, N, C, H, W) frames in [-1, 1], each laid out as ``grid_image`` lays out a
    grid, ``frame_ms`` each, the last held longer; it loops. Grayscale frames keep their exact grey
    levels; RGB ones are reduced to GIF's 256 colours per frame."""
    images = [grid_image(frame) for frame in frames]
    durations = [frame_ms] * (len(images) - 1) + [max(HOLD_LAST_MS, 5 * frame_ms)]
    write_atomically(
        path,
        lambda f: images[0].save(
            f, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
        ),
    )


def save_individual(images: torch.Tensor, folder: Path, start: int = 0) -> None:
    """One PNG per image at the model's resolution: folder/00000.png, 00001.png, ..."""
    for i, image in enumerate(images):
        save_png(to_pil(image), folder / f"{start + i:05d}.png")


def forward_timesteps(timesteps: int, columns: int) -> list[int]:
    """``columns`` paper timesteps evenly spread over 0 ... T, both ends included (t = 0 is x_0 itself)."""
    columns = min(columns, timesteps + 1)
    return sorted({round(i * timesteps / (columns - 1)) for i in range(columns)})


def forward_figure(diffusion: Diffusion, x0: torch.Tensor, seed: int, columns: int = 9) -> Image.Image:
    """Rows: training images; columns: the same image noised by q_sample at t = 0 ... T (labelled)."""
    ts = forward_timesteps(diffusion.timesteps, columns)
    x0 = x0.detach().float().cpu()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    on_cpu = diffusion.to("cpu")
    index = torch.zeros(x0.shape[0], dtype=torch.long)
    frames = [x0 if t == 0 else on_cpu.q_sample(x0, index + (t - 1), noise) for t in ts]
    # row-major: image i at every t, then image i + 1
    grid = grid_image(torch.stack(frames, dim=1).flatten(0, 1), ncol=len(ts))

    cell = x0.shape[-1] * display_scale(x0.shape[-1]) + 2
    header = 14
    white, black = (255, 0) if grid.mode == "L" else ("white", "black")
    figure = Image.new(grid.mode, (grid.width, grid.height + header), color=white)
    figure.paste(grid, (0, header))
    draw = ImageDraw.Draw(figure)
    for j, t in enumerate(ts):
        draw.text((2 + j * cell, 1), f"t={t}", fill=black)
    return figure
