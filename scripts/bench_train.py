"""Training-step throughput of ddpm beside the reference implementations, measured in the same run.

    python scripts/bench_train.py --shape seed28 --impl ddpm,lucidrains,diffusers

Random data, Adam, noise-prediction MSE, one optimizer step per iteration. Each implementation runs
``--warmup`` steps, then ``--repeats`` blocks of ``--steps`` steps; a block's time ends with a device
synchronisation, and the figure quoted is the median block. The references come from the optional
``bench`` extra (``pip install -e '.[bench]'``); an implementation that is not installed is reported as such.
Shapes follow ../shared/ANCHORS.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddpm.diffusion.forward import Loss, Objective
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.models.unet import UNet
from ddpm.runtime import resolve_device
from ddpm.training.step import StepOptions, step_draws, train_step


@dataclass(frozen=True)
class Shape:
    size: int
    channels: int
    dim: int
    dim_mults: tuple[int, ...]
    batch: int
    timesteps: int = 1000


SHAPES = {
    "digits16": Shape(16, 1, 32, (1, 2, 4), 128, 200),
    "seed28": Shape(28, 1, 28, (1, 2, 4), 128, 200),
    "cifar32": Shape(32, 3, 64, (1, 2, 4, 8), 128),
    "cat128": Shape(128, 3, 64, (1, 2, 4, 8), 32),
}

Step = Callable[[torch.Tensor], torch.Tensor]


def ddpm_step(shape: Shape, device: torch.device) -> tuple[Step, torch.nn.Module]:
    model = UNet(shape.channels, shape.dim, shape.dim_mults).to(device)
    schedule = Schedule.from_betas(linear_betas(shape.timesteps, 1e-4, 0.02)).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    # ddpm-train's own step, with its non-finite watch (on_nonfinite=stop: no host sync)
    opts = StepOptions(Loss.l2, Objective.eps, 0.0, 0.0, grad_accum=1, grad_clip=0.0, skip_nonfinite=False)

    steps = iter(range(1, 10**9))

    def step(x0: torch.Tensor) -> torch.Tensor:
        t, noise = step_draws(0, next(steps), x0.shape, shape.timesteps, 0.0, x0.device)
        return train_step(model, opt, schedule, x0, t, noise, opts).loss

    return step, model


def lucidrains_step(shape: Shape, device: torch.device) -> tuple[Step, torch.nn.Module]:
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    unet = Unet(dim=shape.dim, dim_mults=shape.dim_mults, channels=shape.channels, flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=shape.size, timesteps=shape.timesteps).to(device)
    opt = torch.optim.Adam(diffusion.parameters(), lr=1e-4)

    def step(x0: torch.Tensor) -> torch.Tensor:
        loss = diffusion((x0 + 1) / 2)  # it takes images in [0, 1] and rescales them itself
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, unet


def diffusers_step(shape: Shape, device: torch.device) -> tuple[Step, torch.nn.Module]:
    from diffusers import DDPMScheduler, UNet2DModel

    # diffusers' GroupNorm has 32 groups: widths are rounded up to multiples of 32.
    widths = tuple(-(-shape.dim * m // 32) * 32 for m in shape.dim_mults)
    n = len(widths)
    unet = UNet2DModel(
        sample_size=shape.size,
        in_channels=shape.channels,
        out_channels=shape.channels,
        layers_per_block=2,
        block_out_channels=widths,
        down_block_types=("DownBlock2D",) + ("AttnDownBlock2D",) * (n - 1),
        up_block_types=("AttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
    ).to(device)
    scheduler = DDPMScheduler(num_train_timesteps=shape.timesteps)
    opt = torch.optim.Adam(unet.parameters(), lr=1e-4)

    def step(x0: torch.Tensor) -> torch.Tensor:
        noise = torch.randn_like(x0)
        t = torch.randint(0, shape.timesteps, (x0.shape[0],), device=device)
        loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.detach()

    return step, unet


IMPLS = {"ddpm": ddpm_step, "lucidrains": lucidrains_step, "diffusers": diffusers_step}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(impl: str, shape: Shape, device: torch.device, warmup: int, steps: int, repeats: int) -> dict:
    torch.manual_seed(0)
    step, model = IMPLS[impl](shape, device)
    x0 = torch.rand(shape.batch, shape.channels, shape.size, shape.size, device=device) * 2 - 1
    for _ in range(warmup):
        step(x0)
    sync(device)
    blocks = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(x0)
        sync(device)
        blocks.append((time.perf_counter() - start) / steps)
    assert torch.isfinite(loss), f"{impl}: non-finite loss"
    ms = statistics.median(blocks) * 1e3
    params = sum(p.numel() for p in model.parameters())
    return {"impl": impl, "params_m": params / 1e6, "ms_per_step": ms, "img_per_s": shape.batch / ms * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="seed28", choices=sorted(SHAPES))
    parser.add_argument("--impl", default="ddpm,lucidrains,diffusers")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    impls = args.impl.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impl {','.join(unknown)} is invalid: choose from {', '.join(IMPLS)}")
    device = resolve_device(args.device)
    shape = SHAPES[args.shape]
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({platform.processor() or 'cpu'}, {torch.get_num_threads()} threads)"
    )
    print(f"shape {args.shape}: {shape} | device {where} | torch {torch.__version__}")
    print(f"median of {args.repeats} blocks of {args.steps} steps after {args.warmup} warm-up steps")
    results = {}
    for impl in impls:
        try:
            results[impl] = measure(impl, shape, device, args.warmup, args.steps, args.repeats)
        except ImportError as e:
            print(f"{impl:>10}: not installed ({e.name}); pip install -e '.[bench]'")
            continue
        r = results[impl]
        print(
            f"{impl:>10}: {r['params_m']:6.2f}M params | {r['ms_per_step']:8.1f} ms/step | "
            f"{r['img_per_s']:8.1f} img/s"
        )
    if "ddpm" in results:
        for impl, r in results.items():
            if impl != "ddpm":
                print(f"ddpm / {impl}: {results['ddpm']['img_per_s'] / r['img_per_s']:.2f}x img/s")


if __name__ == "__main__":
    main()
