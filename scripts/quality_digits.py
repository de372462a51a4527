"""Time to quality on the embedded digits: train for a fixed wall-clock budget, draw 1,000 samples and
score them with the classifier-feature FID of ddpm-eval, for ddpm's default recipe and for
denoising-diffusion-pytorch's GaussianDiffusion (the bench extra), side by side at the same resolution.

    python scripts/quality_digits.py --reference-minutes 10 --ours-minutes 5,10

Budgets count training only; sampling and scoring are timed separately. Every run uses the same data,
the same classifier (trained once on all 1,797 digits) and the same 1,797 real images as reference.
Grids of each run's first 64 samples are written to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from ddpm.config import register_configs
from ddpm.data import build_dataset, load_subset
from ddpm.diffusion.sampling import SamplingOptions, generate
from ddpm.diffusion.schedules import build_schedule
from ddpm.evaluation.features import classifier_extractor
from ddpm.evaluation.metrics import fid, precision_recall
from ddpm.images import save_grid
from ddpm.models import build_model
from ddpm.runtime import seed_everything
from ddpm.trained import TrainedModel
from ddpm.training.ema import EMA
from ddpm.training.plan import plain_config
from ddpm.training.step import LRDecay, StepOptions, lr_factor, step_draws, train_step


def ours(minutes: float, images: torch.Tensor, n: int, overrides: list[str]) -> tuple[torch.Tensor, dict]:
    """ddpm's recipe as the configs give it (plus ``overrides``), stopped after ``minutes`` of training."""
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=["device=cpu", *overrides])
    seed_everything(cfg.seed)
    schedule = build_schedule(cfg.schedule, cfg.timesteps)
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    opts = StepOptions.from_config(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        for group in opt.param_groups:  # warm-up only: the cosine decay needs a step count, not a budget
            group["lr"] = cfg.lr * lr_factor(step, cfg.lr_warmup, LRDecay.none, 1)
        batch = images[torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)]
        step += 1
        t, noise = step_draws(cfg.seed, step, batch.shape, cfg.timesteps, opts.offset_noise, batch.device)
        train_step(model, opt, schedule, batch, t, noise, opts)
        if ema is not None:
            ema.update(step)
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    trained = TrainedModel.from_config(ema.model if ema is not None else model, schedule, plain_config(cfg))
    sampling = SamplingOptions.from_config(cfg)
    samples = generate(trained, sampling, n, 0, 250)
    info = {
        "steps": step,
        "train_s": train_s,
        "sample_s": time.perf_counter() - start,
        "sampler": f"{cfg.sampler}, {sampling.steps(cfg.timesteps)} steps",
    }
    return samples, info


def reference(minutes: float, images: torch.Tensor, n: int, dim: int, lr: float) -> tuple[torch.Tensor, dict]:
    """GaussianDiffusion with its own defaults (T=1000, sigmoid schedule, v-prediction), the EMA its
    Trainer keeps (0.995 every 10 steps), Adam at ``lr``, batch 128; DDIM with 250 steps to sample."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA as RefEMA

    torch.manual_seed(0)
    unet = Unet(dim=dim, dim_mults=(1, 2, 4), channels=images.shape[1], flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=images.shape[-1], timesteps=1000, sampling_timesteps=250)
    ema = RefEMA(diffusion, beta=0.995, update_every=10)
    opt = torch.optim.Adam(diffusion.parameters(), lr=lr)
    data = (images + 1) / 2  # it takes [0, 1] and normalises itself
    g = torch.Generator().manual_seed(0)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        loss = diffusion(data[torch.randint(0, data.shape[0], (128,), generator=g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        step += 1
    train_s = time.perf_counter() - start
    start = time.perf_counter()
    ema.ema_model.eval()
    with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar per sampling batch
        samples = torch.cat([ema.ema_model.sample(batch_size=min(250, n - i)) for i in range(0, n, 250)])
    info = {
        "steps": step,
        "train_s": train_s,
        "sample_s": time.perf_counter() - start,
        "sampler": "ddim, 250 steps",
    }
    return samples * 2 - 1, info


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reference-minutes", default="10", help="comma-separated training budgets")
    parser.add_argument("--ours-minutes", default="5,10", help="comma-separated training budgets")
    parser.add_argument("--reference-dim", type=int, default=32)
    parser.add_argument("--reference-lr", type=float, default=1e-3)
    parser.add_argument("--n", type=int, default=1000, help="samples scored per run")
    parser.add_argument("--override", action="append", default=[], help="extra ddpm-train override")
    parser.add_argument("--out", default="runs/quality_digits")
    args = parser.parse_args()

    register_configs()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        data_cfg = compose(config_name="train").data
    real, labels = load_subset(build_dataset(data_cfg), 1797, seed=0)
    extract, accuracy = classifier_extractor(real, labels, out / "classifier.pt", steps=2000, seed=0)
    real_features = extract(real)
    print(
        f"classifier held-out accuracy {accuracy:.1%}; {real.shape[0]} real digits at 8x8; CPU threads "
        f"{torch.get_num_threads()}"
    )

    runs = [("ddpm", float(m)) for m in args.ours_minutes.split(",") if m]
    runs += [("lucidrains", float(m)) for m in args.reference_minutes.split(",") if m]
    rows = []
    for impl, minutes in runs:
        if impl == "ddpm":
            samples, info = ours(minutes, real, args.n, args.override)
        else:
            samples, info = reference(minutes, real, args.n, args.reference_dim, args.reference_lr)
        fake_features = extract(samples.clamp(-1, 1))
        precision, recall = precision_recall(real_features, fake_features)
        settings = {"lr": args.reference_lr, "dim": args.reference_dim} if impl == "lucidrains" else {}
        row = {
            "impl": impl,
            "minutes": minutes,
            **settings,
            "fid": fid(real_features, fake_features),
            "precision": precision,
            "recall": recall,
            **info,
        }
        rows.append(row)
        tag = f"_lr{args.reference_lr:g}_dim{args.reference_dim}" if impl == "lucidrains" else ""
        save_grid(samples[:64], out / f"{impl}_{minutes:g}min{tag}.png")
        print(
            f"{impl:>10} {minutes:4g} min: {info['steps']:6d} steps | classifier FID {row['fid']:8.3f} | "
            f"precision {precision:.3f} | recall {recall:.3f} | sampling ({info['sampler']}) "
            f"{info['sample_s']:.0f} s",
            flush=True,
        )
    report = out / "quality.json"
    earlier = json.loads(report.read_text())["runs"] if report.is_file() else []
    report.write_text(json.dumps({"classifier_accuracy": accuracy, "runs": earlier + rows}, indent=2))


if __name__ == "__main__":
    main()
