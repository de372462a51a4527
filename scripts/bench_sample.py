"""Sampling throughput of ddpm beside denoising-diffusion-pytorch's GaussianDiffusion.sample, in one process.

    python scripts/bench_sample.py --shape seed28                    # 1,000-step ancestral loop, both
    python scripts/bench_sample.py --shape cifar32 --sampler ddim --sample-steps 50   # ddpm alone

ddpm draws as ddpm-sample does (``generate``: x_T, the sampler's loop, the images back on the host) from a
freshly initialised U-Net of the shape (bench_train.py's SHAPES); the reference is lucidrains'
``GaussianDiffusion(..., objective="pred_noise", beta_schedule="linear").sample``, whose ancestral loop
visits all T steps, so it runs only beside ddpm's ``ddpm`` sampler over all T (its tqdm bar is off).
After ``--warmup`` blocks each, blocks alternate (ddpm, reference, ddpm, ...) so that a machine that
speeds up or slows down during the run weighs on both alike; a block is one call that draws ``--n``
images and ends with a device synchronisation, and the figure quoted is the median of ``--repeats``
blocks. The reference comes from the optional ``bench`` extra (``pip install -e '.[bench]'``). Its linear
schedule scales Ho et al.'s betas by 1000 / T and ddpm's does not: the same at the default T=1,000, the
same work per step at any T, but its last beta reaches 1 at T <= 20. Both run in fp32, without compile.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's per-step progress bar: not part of the work

import torch
from bench_train import SHAPES, Shape

from ddpm.config import train_config
from ddpm.diffusion.gaussian import Diffusion
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SAMPLERS, SamplingOptions
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.models import build_model
from ddpm.models.unet import UNet
from ddpm.runtime import resolve_device
from ddpm.trained import TrainedModel

Draw = Callable[[], torch.Tensor]  # one block: --n images in [-1, 1] (or [0, 1] for the reference)


def ddpm_draw(
    shape: Shape, timesteps: int, sampling: SamplingOptions, n: int, device: torch.device, model_name: str
) -> tuple[Draw, torch.nn.Module]:
    if model_name == "ho2020":  # Ho et al.'s CIFAR-10 U-Net as model=ho2020 configures it
        cfg = train_config(
            ["model=ho2020", f"data.image_size={shape.size}", f"data.channels={shape.channels}"]
        )
        model = build_model(cfg.model, shape.channels, shape.size).to(device).eval()
    else:
        model = UNet(shape.channels, shape.dim, shape.dim_mults).to(device).eval()
    diffusion = Diffusion(Schedule.from_betas(linear_betas(timesteps, 1e-4, 0.02))).to(device)
    trained = TrainedModel(model, diffusion, (shape.channels, shape.size, shape.size))
    seeds = iter(range(10**9))
    return lambda: generate(trained, sampling, n, next(seeds), batch_size=n), model


def lucidrains_draw(
    shape: Shape, timesteps: int, n: int, device: torch.device
) -> tuple[Draw, torch.nn.Module]:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    unet = Unet(dim=shape.dim, dim_mults=shape.dim_mults, channels=shape.channels, flash_attn=False)
    diffusion = GaussianDiffusion(
        unet,
        image_size=shape.size,
        timesteps=timesteps,
        sampling_timesteps=timesteps,  # the ancestral loop over all T, as ddpm's
        objective="pred_noise",
        beta_schedule="linear",
    ).to(device)
    diffusion.eval()
    return lambda: diffusion.sample(batch_size=n), unet


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def block(name: str, draw: Draw, device: torch.device) -> tuple[float, float | None]:
    """Seconds for one call and the peak device memory it reached (GiB; None on the CPU)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    sync(device)
    start = time.perf_counter()
    images = draw()
    sync(device)
    seconds = time.perf_counter() - start
    # lucidrains' linear schedule scales its betas by 1000 / T: the last reaches 1 at T <= 20
    assert torch.isfinite(images).all(), f"{name}: non-finite samples (with lucidrains, keep T > 20)"
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cudnn = torch.backends.cudnn.version()
        return f"{name} | torch {torch.__version__} | CUDA {torch.version.cuda} | cuDNN {cudnn}"
    cpu = platform.processor() or platform.machine() or "cpu"
    threads = torch.get_num_threads()
    return f"CPU ({cpu}, {threads} threads) | torch {torch.__version__} (built for CUDA {torch.version.cuda})"


def report(
    name: str, seconds: list[float], peaks: list[float | None], n: int, steps: int, params: int
) -> float:
    """Print one implementation's line; return its images per second (median block)."""
    median = statistics.median(seconds)
    peak = max((p for p in peaks if p is not None), default=None)
    memory = f"{peak:6.2f} GiB peak" if peak is not None else "peak n/a (CPU)"
    spread = f"range {min(seconds):.2f}-{max(seconds):.2f}"
    print(
        f"{name:>10}: {params / 1e6:6.2f}M params | {n / median:9.1f} img/s | "
        f"{median / steps * 1e3:8.2f} ms per step | {median:8.2f} s per block ({spread}) | {memory}"
    )
    return n / median


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="seed28", choices=sorted(SHAPES))
    parser.add_argument("--timesteps", type=int, default=1000, help="T of the schedule")
    parser.add_argument("--sampler", default="ddpm", choices=sorted(SAMPLERS))
    parser.add_argument("--sample-steps", type=int, default=None, help="steps visited (default: all T)")
    parser.add_argument(
        "--n", type=int, default=None, help="images per block, one batch (default: the shape's)"
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed blocks per implementation")
    parser.add_argument("--warmup", type=int, default=1, help="untimed blocks per implementation first")
    parser.add_argument("--no-reference", action="store_true", help="time ddpm alone")
    parser.add_argument(
        "--model",
        default="unet",
        choices=["unet", "ho2020"],
        help="ddpm's U-Net: the shape's annotated one, or model=ho2020 at the shape's size (ddpm alone)",
    )
    parser.add_argument("--device", default="auto")
    return parser.parse_args()


def main() -> None:
    args = parse()
    device = resolve_device(args.device)
    shape = SHAPES[args.shape]
    n = args.n or shape.batch
    sampling = SamplingOptions(sampler=args.sampler, sample_steps=args.sample_steps)
    steps = sampling.steps(args.timesteps)
    torch.manual_seed(0)
    draws = {"ddpm": ddpm_draw(shape, args.timesteps, sampling, n, device, args.model)}
    if args.no_reference or args.sampler != "ddpm" or steps != args.timesteps or args.model != "unet":
        print("reference: not run (it has the annotated U-Net and an ancestral loop over all T only)")
    else:
        try:
            draws["lucidrains"] = lucidrains_draw(shape, args.timesteps, n, device)
        except ImportError as e:
            print(f"lucidrains: not installed ({e.name}); pip install -e '.[bench]'")
    print(f"device {describe_device(device)}")
    size = f"{shape.size}x{shape.size}x{shape.channels}, " + (
        "model=ho2020" if args.model == "ho2020" else f"dim {shape.dim}, {shape.dim_mults}"
    )
    print(
        f"shape {args.shape} ({size}) | T={args.timesteps} | {args.sampler}, {steps} steps | {n} images per "
        f"block | median of {args.repeats} interleaved blocks after {args.warmup} warm-up blocks each"
    )
    for name, (draw, _) in draws.items():
        for _ in range(args.warmup):
            block(name, draw, device)
    seconds: dict[str, list[float]] = {k: [] for k in draws}
    peaks: dict[str, list[float | None]] = {k: [] for k in draws}
    for _ in range(args.repeats):
        for name, (draw, _) in draws.items():
            s, p = block(name, draw, device)
            seconds[name].append(s)
            peaks[name].append(p)
    rates = {
        name: report(name, seconds[name], peaks[name], n, steps, sum(p.numel() for p in model.parameters()))
        for name, (_, model) in draws.items()
    }
    print(f"ddpm: 50,000 images would take {50_000 / rates['ddpm']:,.0f} s at this rate ({n} per batch)")
    if "lucidrains" in rates:
        print(f"ddpm / lucidrains: {rates['ddpm'] / rates['lucidrains']:.2f}x img/s")


if __name__ == "__main__":
    main()
