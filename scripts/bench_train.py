"""Training-step throughput of ddpm beside the reference implementations, measured in the same process.

    python scripts/bench_train.py --shape seed28 --impl ddpm,lucidrains,diffusers
    python scripts/bench_train.py --shape cifar32 --precision bf16 --compile true --cuda-graph true
    python scripts/bench_train.py --shape digits8 --impl ddpm --precision bf16 --dim 32,24 \
        --channels-last false,true

Random data, Adam, one optimizer step per iteration. ddpm runs the step ddpm-train runs (TrainStep: its
draws, learning rate, EMA update and non-finite flag, under the precision, compilation and CUDA graph
that ``--precision``, ``--compile`` and ``--cuda-graph`` choose, as the config keys of the same names:
"auto" / "null" pick what ddpm-train picks on the device). The CPU levers are lists, one ddpm per
combination: ``--precision``, the U-Net's base width ``--dim`` (default: the shape's) and
``--channels-last`` (the U-Net's weights and the batch in channels-last memory, which oneDNN's convolutions
prefer). The references run their own step in fp32 at the shape's width, as their examples do.

Every implementation is built and warmed up first (the warm-up, which holds any compilation, is timed
apart); then blocks of ``--steps`` steps are timed in turn, ddpm, reference, ddpm, ..., ``--repeats`` rounds,
each block ending with a device synchronisation, so a machine's drift touches every implementation alike.
The figure quoted is the median block. FLOPs per step are counted once with torch.utils.flop_counter on
the fp32 forward and backward; MFU divides the achieved rate by the device's dense peak (``--peak-tflops``
or the table below, bf16 tensor-core peak for bf16 runs, TF32 for fp32 on a GPU).
The references come from the optional ``bench`` extra (``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
import itertools
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion, Loss
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.models.unet import UNet
from ddpm.runtime import Precision, Runtime, resolve_device
from ddpm.training.accel import prepare_net
from ddpm.training.ema import EMA
from ddpm.training.step import LRDecay, StepOptions, TrainStep, build_optimizer


@dataclass(frozen=True)
class Shape:
    size: int
    channels: int
    dim: int
    dim_mults: tuple[int, ...]
    batch: int
    timesteps: int = 1000


SHAPES = {
    "digits8": Shape(8, 1, 32, (1, 2, 4), 128, 200),  # the default ddpm-train job's step
    "digits16": Shape(16, 1, 32, (1, 2, 4), 128, 200),
    "seed28": Shape(28, 1, 28, (1, 2, 4), 128, 200),
    "cifar32": Shape(32, 3, 64, (1, 2, 4, 8), 128),
    "cat128": Shape(128, 3, 64, (1, 2, 4, 8), 32),
}

# dense peak TFLOP/s (bf16 tensor cores, TF32) of the GPUs the figures come from, by name
PEAKS = {"H100": (989.0, 494.0), "H200": (989.0, 494.0), "A100": (312.0, 156.0)}

Step = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Choices:
    """ddpm's precision, compile and cuda_graph, as given on the command line, and the CPU levers."""

    precision: str
    compile: bool | None
    cuda_graph: bool | None
    dim: int | None = None  # None: the shape's
    channels_last: bool = False

    def runtime(self, device: torch.device) -> Runtime:
        return Runtime.resolved(device, Precision(self.precision), self.compile, self.cuda_graph)


def ddpm_step(shape: Shape, device: torch.device, choices: Choices) -> tuple[Step, torch.nn.Module]:
    dim = choices.dim or shape.dim
    model = UNet(shape.channels, dim, shape.dim_mults).to(device)
    memory = torch.channels_last if choices.channels_last else torch.contiguous_format
    model.to(memory_format=memory)
    schedule = Schedule.from_betas(linear_betas(shape.timesteps, 1e-4, 0.02))
    diffusion = Diffusion(schedule, loss=Loss.l2).to(device)
    runtime = choices.runtime(device)
    net = prepare_net(model, runtime)
    opt = build_optimizer(model, 1e-4, device, capturable=runtime.cuda_graph)
    ema = EMA(model, 0.9999, 0)
    opts = StepOptions(0, shape.batch, 1e-4, 0, LRDecay.none, 10**9, 1, grad_clip=0.0, skip_nonfinite=False)
    train_step = TrainStep(model, net, opt, diffusion, ema, opts, runtime)
    steps = iter(range(1, 10**9))

    def step(x0: torch.Tensor) -> torch.Tensor:
        return train_step(next(steps), Batch(x0.contiguous(memory_format=memory)))["loss"]

    levers = [f"dim {dim}"] if choices.dim else []
    levers += ["channels-last"] if choices.channels_last else []
    describe = runtime.describe().split(", ", 1)[1]  # without the device
    step.describe = ", ".join([describe, *levers])  # type: ignore[attr-defined]
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


def step_flops(model: torch.nn.Module, shape: Shape, device: torch.device) -> float:
    """FLOPs of one fp32 forward and backward of the model on a batch (what the step's arithmetic costs)."""
    x = torch.randn(shape.batch, shape.channels, shape.size, shape.size, device=device)
    t = torch.randint(0, shape.timesteps, (shape.batch,), device=device)
    with FlopCounterMode(display=False) as counter:
        out = model(x, t)
        getattr(out, "sample", out).float().square().mean().backward()  # diffusers returns an output object
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


@dataclass
class Contender:
    impl: str
    step: Step
    model: torch.nn.Module
    warmup_s: float
    peak_gb: float | None
    blocks: list[float]
    describe: str


def build(
    impl: str, shape: Shape, device: torch.device, choices: Choices, warmup: int, x0: torch.Tensor
) -> Contender:
    """Build, then warm up (compilation and capture included, timed apart from the blocks)."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    start = time.perf_counter()
    if impl == "ddpm":
        step, model = ddpm_step(shape, device, choices)
    else:
        step, model = IMPLS[impl](shape, device)
    for _ in range(warmup):
        step(x0)
    sync(device)
    warmup_s = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated(device) - before) / 2**30 if device.type == "cuda" else None
    describe = getattr(step, "describe", "fp32, eager")
    return Contender(impl, step, model, warmup_s, peak, [], describe)


def time_block(c: Contender, x0: torch.Tensor, steps: int, device: torch.device) -> None:
    start = time.perf_counter()
    for _ in range(steps):
        loss = c.step(x0)
    sync(device)
    c.blocks.append((time.perf_counter() - start) / steps)
    assert torch.isfinite(loss), f"{c.impl}: non-finite loss"


def peak_tflops(device: torch.device, bf16: bool, given: float | None) -> float | None:
    if given is not None:
        return given
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (bf16_peak, tf32_peak) in PEAKS.items():
        if key in name:
            return bf16_peak if bf16 else tf32_peak
    return None


def where(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def switch(value: str) -> bool | None:
    return {"true": True, "false": False, "null": None, "auto": None}[value]


def positive_int(text: str, parser: argparse.ArgumentParser) -> int:
    if not text.isdigit() or int(text) < 1:
        parser.error(f"--dim {text} is invalid: give positive integers, e.g. 32,24")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", default="seed28", choices=sorted(SHAPES))
    parser.add_argument("--impl", default="ddpm,lucidrains,diffusers")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--precision", default="auto", help="auto, fp32 or bf16; a list (fp32,bf16) times one ddpm per entry"
    )
    parser.add_argument("--dim", default=None, help="ddpm's U-Net width; a list (32,24): one ddpm per entry")
    parser.add_argument(
        "--channels-last", default="false", help="false or true; a list (false,true) times one ddpm per entry"
    )
    parser.add_argument("--compile", default="auto", choices=["auto", "null", "true", "false"])
    parser.add_argument("--cuda-graph", default="auto", choices=["auto", "null", "true", "false"])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, for MFU")
    args = parser.parse_args()

    impls = args.impl.split(",")
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impl {','.join(unknown)} is invalid: choose from {', '.join(IMPLS)}")
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    shape = SHAPES[args.shape]
    precisions = args.precision.split(",")
    bad = [p for p in precisions if p not in {q.value for q in Precision}]
    if bad:
        parser.error(f"--precision {','.join(bad)} is invalid: choose from auto, fp32, bf16")
    dims = [None] if args.dim is None else [positive_int(d, parser) for d in args.dim.split(",")]
    layouts = args.channels_last.split(",")
    if any(v not in {"false", "true"} for v in layouts):
        parser.error(f"--channels-last {args.channels_last} is invalid: choose from false, true")
    variants = [
        Choices(p, switch(args.compile), switch(args.cuda_graph), d, c == "true")
        for p, d, c in itertools.product(precisions, dims, layouts)
    ]
    print(f"shape {args.shape}: {shape}")
    print(f"device {where(device)} | torch {torch.__version__}")
    print(
        f"median of {args.repeats} interleaved blocks of {args.steps} steps, "
        f"after {args.warmup} warm-up steps"
    )
    x0 = torch.rand(shape.batch, shape.channels, shape.size, shape.size, device=device) * 2 - 1
    contenders = []
    for impl in impls:
        for choices in variants if impl == "ddpm" else variants[:1]:
            try:
                contenders.append(build(impl, shape, device, choices, args.warmup, x0))
            except ImportError as e:
                print(f"{impl:>10}: not installed ({e.name}); pip install -e '.[bench]'")
    for _ in range(args.repeats):
        for c in contenders:
            time_block(c, x0, args.steps, device)
    results: dict[str, float] = {}
    for c in contenders:
        ms = statistics.median(c.blocks) * 1e3
        flops = step_flops(c.model, shape, device)
        tflops = flops / (ms / 1e3) / 1e12
        peak = peak_tflops(device, "bf16" in c.describe, args.peak_tflops)
        mfu = f"{100 * tflops / peak:5.1f}%" if peak else "  n/a"
        memory = f"{c.peak_gb:6.2f} GB" if c.peak_gb is not None else "     n/a"
        params = sum(p.numel() for p in c.model.parameters()) / 1e6
        name = f"{c.impl} ({c.describe})" if c.impl == "ddpm" else c.impl
        results[name] = shape.batch / ms * 1e3
        print(
            f"{c.impl:>10}: {params:6.2f}M params | {c.describe} | {ms:8.1f} ms/step | "
            f"{results[name]:8.1f} img/s | {tflops:6.2f} TFLOP/s | MFU {mfu} | peak {memory} | "
            f"warm-up {c.warmup_s:6.1f} s"
        )
    for ours in (n for n in results if n.startswith("ddpm")):
        for theirs in (n for n in results if not n.startswith("ddpm")):
            print(f"{ours} / {theirs}: {results[ours] / results[theirs]:.2f}x img/s")


if __name__ == "__main__":
    main()
