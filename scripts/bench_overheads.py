"""What the fault handling costs, measured beside the work it guards, in the same run.

    python scripts/bench_overheads.py --steps 8 --images 2000

1. The non-finite watch: ddpm-train's ``TrainStep.optimize`` (which also takes the gradient's norm and a
   finite flag) against a bare training_losses / backward / Adam step, the two interleaved on one model
   (seed28 shape: 28x28x1, dim 28, (1, 2, 4), batch 128), and the norm alone. Medians.
2. The start-up scan of a folder data set: building ``FolderDataset`` (which decodes every file once)
   over ``--images`` 64x64 JPEGs, against reading the same images once through the dataset. Medians of 3.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

from ddpm.data.batch import Batch
from ddpm.data.folder import FolderDataset
from ddpm.diffusion.gaussian import Diffusion, Loss
from ddpm.diffusion.schedules import Schedule, linear_betas
from ddpm.models.unet import UNet
from ddpm.runtime import Runtime
from ddpm.training.step import LRDecay, StepOptions, TrainStep, build_optimizer

T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    """fn's result and its wall time in ms."""
    start = time.perf_counter()
    result = fn()
    return result, (time.perf_counter() - start) * 1000


def watch_cost(steps: int) -> None:
    torch.manual_seed(0)
    model = UNet(1, 28, (1, 2, 4))
    diffusion = Diffusion(Schedule.from_betas(linear_betas(200, 1e-4, 0.02)), loss=Loss.l2)
    cpu = torch.device("cpu")
    opt = build_optimizer(model, 1e-4, cpu)
    opts = StepOptions(
        0, 128, 1e-4, 0, LRDecay.none, 10**9, grad_accum=1, grad_clip=0.0, skip_nonfinite=False
    )
    step = TrainStep(model, model, opt, diffusion, None, opts, Runtime(cpu))
    batch = Batch(torch.rand(128, 1, 28, 28) * 2 - 1)
    step_numbers = iter(range(1, 10**9))

    def watched() -> object:  # the optimizing part of ddpm-train's step, on its own draws of t and eps
        return step.optimize(step.draws(next(step_numbers), batch))

    def bare() -> None:
        t = torch.randint(0, 200, (128,))
        loss = diffusion.training_losses(model, batch.images, t, torch.randn_like(batch.images))[
            "loss"
        ].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    runs: dict[str, Callable[[], object]] = {
        "bare step": bare,
        "TrainStep (with the watch)": watched,
        "gradient norm alone": lambda: torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]),
    }
    for fn in runs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, fn in runs.items():
            times[name].append(timed(fn)[1])
    med = {name: statistics.median(t) for name, t in times.items()}
    for name, ms in med.items():
        print(f"{name:>28}: {ms:9.1f} ms")
    print(f"TrainStep / bare step: {med['TrainStep (with the watch)'] / med['bare step']:.3f}x time")


def scan_cost(n: int) -> None:
    with tempfile.TemporaryDirectory() as root:
        rng = np.random.default_rng(0)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(Path(root) / f"{i}.jpg")
        build, read = [], []
        for _ in range(3):
            dataset, ms = timed(lambda: FolderDataset(root, image_size=64, channels=3))
            build.append(ms)
            read.append(timed(lambda ds=dataset: [ds[i] for i in range(len(ds))])[1])
        b, r = statistics.median(build), statistics.median(read)
        print(f"scan of {n} 64x64 JPEGs (FolderDataset): {b:9.1f} ms ({b / n:.3f} ms per file)")
        print(f"one read of them through the dataset:   {r:9.1f} ms; scan / read: {b / r:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="interleaved rounds of the step comparison")
    parser.add_argument("--images", type=int, default=2000, help="JPEGs in the scanned folder")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    watch_cost(args.steps)
    scan_cost(args.images)


if __name__ == "__main__":
    main()
