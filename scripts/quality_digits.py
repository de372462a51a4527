"""Time to quality on the embedded digits: train for a fixed wall-clock time, draw --n samples and score
them as ddpm-eval does, in the digit classifier's features and in raw pixels, for ddpm's recipe (one or more
settings) and for denoising-diffusion-pytorch's GaussianDiffusion (the bench extra, one or more U-Nets,
each trained model sampled with each of its sampling_timesteps), every setting once per seed.

    python scripts/quality_digits.py --ours default precision=bf16 --ours-minutes 5 \\
        --reference mults=1-2-4 mults=1-2 --reference-minutes 10 --reference-sampling-steps 100,250 \\
        --seeds 0,1,2

ddpm trains as ddpm-train does (fused Adam with the lr in a device tensor, the EMA written by at/apply,
the U-Net under the config's precision and compile as the Runtime resolves them on the CPU), on random
batches of all 1,797 digits. A seed changes the initial weights, the batches, t and eps, and the sampling
noise. Budgets count training only; sampling and scoring are timed separately.

Scoring is ddpm-eval's (its Scorer, its cached classifier): --n generated images against --n-real real
digits (default: 1,797 - n), and the floor, --n other real digits against the same reals (what a perfect
model scores at this many images). The table gives the median over seeds and the [min, max] range;
"beats ... by more than the spread" means ddpm's worst seed scores below every reference row's best seed.
Results go to <out>/quality.json and <out>/quality.md, and a grid of each run's first 64 samples to <out>.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig

from ddpm.config import register_configs, train_config
from ddpm.data import build_dataset, load_subset
from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.evaluation.evaluate import Scorer, real_data_config, score
from ddpm.images import save_grid
from ddpm.models import build_model
from ddpm.runtime import Runtime, seed_everything
from ddpm.trained import TrainedModel
from ddpm.training.accel import prepare_net
from ddpm.training.ema import EMA
from ddpm.training.setup import sampling_model
from ddpm.training.step import LRDecay, StepOptions, TrainStep, build_optimizer

SPACES = ("classifier", "pixels")  # the feature spaces every run is scored in
SAMPLE_BATCH = 250
REFERENCE_T = 1000  # GaussianDiffusion's training timesteps (its default)
WARNED: set[tuple[str, str]] = set()  # the scoring warnings printed so far


# ------------------------------------------------------------------------------------------------- ddpm
def ours_config(setting: str, common: list[str], seed: int) -> DictConfig:
    """ddpm-train's checked config for one setting ("default", or space-separated overrides) and seed."""
    overrides = [] if setting == "default" else setting.split()
    cfg = train_config(["device=cpu", *common, *overrides, f"seed={seed}"])
    if cfg.lr_decay is not LRDecay.none:
        raise SystemExit(f"{setting!r}: lr_decay={cfg.lr_decay.name} needs a step count; a budget has none")
    return cfg


def ours_train(cfg: DictConfig, minutes: float, images: torch.Tensor) -> tuple[TrainedModel, dict]:
    """ddpm-train's step (TrainStep, eager) on random batches of ``images`` for ``minutes``. Its learning
    rate warms up as lr_warmup says; lr_decay=none, since a time budget has no step count to decay over."""
    dev = torch.device("cpu")
    runtime = Runtime.resolved(dev, cfg.precision, cfg.compile, cuda_graph=False)
    seed_everything(cfg.seed)
    diffusion = Diffusion.from_config(cfg)
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size)
    optimizer = build_optimizer(model, cfg.lr, dev)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    net = prepare_net(model, runtime)  # after the EMA copy: the EMA averages the plain module's weights
    train_step = TrainStep(model, net, optimizer, diffusion, ema, StepOptions.from_config(cfg), runtime)
    g = torch.Generator().manual_seed(cfg.seed)
    nonfinite = torch.zeros((), dtype=torch.int64)
    model.train()
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        step += 1
        batch = Batch(images[torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)])
        nonfinite += ~train_step(step, batch)["finite"]
    train_s = time.perf_counter() - start
    trained = sampling_model(cfg, diffusion, model, ema, step)
    info = {
        "steps": step,
        "train_s": train_s,
        "nonfinite_steps": int(nonfinite),
        "runtime": runtime.describe(),
        "sampler": f"{cfg.sampler}, {SamplingOptions.from_config(cfg).steps(cfg.timesteps)} steps",
    }
    return trained, info


def ours_sample(cfg: DictConfig, trained: TrainedModel, n: int, seed: int) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    samples = generate(trained, SamplingOptions.from_config(cfg), n, seed, SAMPLE_BATCH)
    return samples, time.perf_counter() - start


# -------------------------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class ReferenceSetting:
    """GaussianDiffusion's U-Net and optimiser: Unet(dim, dim_mults), Adam(lr), ``batch`` images a step."""

    dim: int = 32
    mults: tuple[int, ...] = (1, 2, 4)
    lr: float = 1e-3
    batch: int = 128

    @classmethod
    def parse(cls, text: str) -> ReferenceSetting:
        """ "dim=32,mults=1-2,lr=1e-3,batch=128"; keys left out keep their defaults."""
        values: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("dim", "mults", "lr", "batch"):
                raise SystemExit(f"--reference {text!r}: {item!r} is not dim=, mults=, lr= or batch=")
            if key == "mults":
                values[key] = tuple(int(m) for m in value.split("-"))
            else:
                values[key] = float(value) if key == "lr" else int(value)
        return cls(**values)

    def describe(self) -> str:
        mults = "-".join(map(str, self.mults))
        return f"dim {self.dim}, mults {mults}, lr {self.lr:g}" + (
            f", batch {self.batch}" if self.batch != 128 else ""
        )


def reference_train(
    setting: ReferenceSetting, minutes: float, images: torch.Tensor, seed: int
) -> tuple[torch.nn.Module, dict]:
    """GaussianDiffusion with its own defaults (T=1000, sigmoid schedule, v-prediction) and the EMA its
    Trainer keeps (0.995 every 10 steps), trained for ``minutes``; returns the EMA copy."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet
    from ema_pytorch import EMA as RefEMA

    torch.manual_seed(seed)  # its init, and the t and noise it draws from the global generator
    unet = Unet(dim=setting.dim, dim_mults=setting.mults, channels=images.shape[1], flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=images.shape[-1], timesteps=REFERENCE_T)
    ema = RefEMA(diffusion, beta=0.995, update_every=10)
    opt = torch.optim.Adam(diffusion.parameters(), lr=setting.lr)
    data = (images + 1) / 2  # it takes [0, 1] and normalises itself
    g = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        loss = diffusion(data[torch.randint(0, data.shape[0], (setting.batch,), generator=g)])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        step += 1
    return ema.ema_model.eval(), {"steps": step, "train_s": time.perf_counter() - start}


def reference_sample(diffusion: Any, steps: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    """n samples of the trained model with ``steps`` sampling_timesteps: DDIM below T, its ancestral
    sampler at T (as GaussianDiffusion chooses from its constructor's sampling_timesteps)."""
    diffusion.sampling_timesteps = steps
    diffusion.is_ddim_sampling = steps < diffusion.num_timesteps
    torch.manual_seed(seed)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar per sampling batch
        samples = torch.cat(
            [diffusion.sample(batch_size=min(SAMPLE_BATCH, n - i)) for i in range(0, n, SAMPLE_BATCH)]
        )
    return samples.clone() * 2 - 1, time.perf_counter() - start


def reference_sampler(steps: int) -> str:
    return f"ddim, {steps} steps" if steps < REFERENCE_T else f"ancestral, {steps} steps"


# ------------------------------------------------------------------------------------------------ scores
def eval_scorer(n: int, n_real: int | None, overrides: list[str]) -> tuple[Scorer, int]:
    """ddpm-eval's Scorer for the digits, in SPACES; n_real defaults to the digits not needed for the
    floor (the --n other real digits scored the same way)."""
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        data = compose(config_name="eval", overrides=["data=digits"]).data
    size = len(build_dataset(real_data_config(data)))
    n_real = n_real if n_real is not None else size - n
    if n_real < 1:
        raise SystemExit(f"--n {n} leaves no real digits to score against (there are {size}); lower --n")
    features = f"features=[{','.join(SPACES)}]"
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        cfg = compose(
            config_name="eval",
            overrides=[
                "data=digits",
                "device=cpu",
                "seed=0",
                f"n={n}",
                f"n_real={n_real}",
                features,
                *overrides,
            ],
        )
    return Scorer(cfg, real_data_config(cfg.data), torch.device("cpu")), size


def scores_of(scorer: Scorer, fake: torch.Tensor) -> dict[str, dict]:
    """FID, KID, precision and recall of ``fake`` in each feature space, as ddpm-eval reports them."""
    out = {}
    for name, space in scorer.spaces.items():
        result, warning = score(space.real, space.extract(fake.clamp(-1, 1)), scorer.cfg)
        if warning and (name, warning) not in WARNED:  # once: every run has the same n
            WARNED.add((name, warning))
            print(f"  {name}: {warning}", flush=True)
        out[name] = result
    return out


def floor_of(scorer: Scorer) -> dict[str, dict] | None:
    """The real-vs-real scores: the Scorer's other real digits against its reals (None if the set has too
    few digits for both)."""
    if any(space.other is None for space in scorer.spaces.values()):
        return None
    return {name: score(space.real, space.other, scorer.cfg)[0] for name, space in scorer.spaces.items()}


# ----------------------------------------------------------------------------------------------- summary
def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def spread(values: list[float | None]) -> dict[str, float | None]:
    known = [v for v in values if v is not None]
    if not known:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(known), "min": min(known), "max": max(known)}


def summarise(rows: list[dict]) -> list[dict]:
    """One entry per (run, minutes): medians over the seeds and the range of each FID."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["run"], row["minutes"]), []).append(row)
    summary = []
    for (run, minutes), group in groups.items():
        entry: dict[str, Any] = {
            "run": run,
            "impl": group[0]["impl"],
            "minutes": minutes,
            "seeds": [r["seed"] for r in group],
            "steps": statistics.median(r["steps"] for r in group),
            "sample_s": statistics.median(r["sample_s"] for r in group),
            "sampler": group[0]["sampler"],
        }
        for space in SPACES:
            entry[space] = {
                "fid": spread([r["scores"][space]["fid"] for r in group]),
                "precision": statistics.median(r["scores"][space]["precision"] for r in group),
                "recall": statistics.median(r["scores"][space]["recall"] for r in group),
            }
        summary.append(entry)
    return summary


def fid_text(s: dict[str, float | None], seeds: int) -> str:
    if s["median"] is None:
        return "n/a"
    if seeds == 1:
        return f"{s['median']:.3f}"
    return f"{s['median']:.3f} [{s['min']:.3f}, {s['max']:.3f}]"


def table(summary: list[dict], floor: dict | None, n: int, n_real: int) -> list[str]:
    lines = [
        "| run | training | steps (median) | FID classifier | FID pixels | precision / recall (classifier) "
        f"| sampling {n:,} |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in summary:
        c, p = e["classifier"], e["pixels"]
        k = len(e["seeds"])
        lines.append(
            f"| {e['run']} | {e['minutes']:g} min | {e['steps']:,.0f} | {fid_text(c['fid'], k)} | "
            f"{fid_text(p['fid'], k)} | {c['precision']:.3f} / {c['recall']:.3f} | "
            f"{e['sample_s']:.0f} s ({e['sampler']}) |"
        )
    if floor is not None:
        fids = ", ".join(
            f"{space} {floor[space]['fid']:.3f}" if floor[space]["fid"] is not None else f"{space} n/a"
            for space in SPACES
        )
        lines.append("")
        lines.append(f"Real vs real ({n:,} other real digits against the same {n_real:,}): FID {fids}.")
    return lines


def verdicts(summary: list[dict]) -> list[str]:
    """Per ddpm row and feature space: does it beat every reference row (each U-Net, budget and sampling
    steps) by more than the spread over seeds, i.e. is its worst seed below every reference seed? It is
    set against the reference row whose best seed scores lowest. And each further ddpm setting against the
    first at the same budget: do their ranges overlap (within noise)?"""
    ours = [e for e in summary if e["impl"] == "ddpm"]
    refs = [e for e in summary if e["impl"] == "lucidrains"]
    lines = []
    for e in ours:
        parts = []
        for space in SPACES:
            mine = e[space]["fid"]
            known = [r for r in refs if r[space]["fid"]["min"] is not None]
            if mine["max"] is None or not known:
                parts.append(f"{space}: n/a")
                continue
            best = min(known, key=lambda r: r[space]["fid"]["min"])
            theirs = best[space]["fid"]
            beats = mine["max"] < theirs["min"]
            parts.append(
                f"{space}: {'yes' if beats else 'no'} (max {mine['max']:.3f} vs min {theirs['min']:.3f} of "
                f"{best['run']}, {best['minutes']:g} min)"
            )
        seeds = f"{len(e['seeds'])} seed{'s' if len(e['seeds']) > 1 else ''}"
        lines.append(
            f"{e['run']}, {e['minutes']:g} min ({seeds}) beats every reference row by more than the spread: "
            + "; ".join(parts)
        )
    for e in ours:
        base = next((b for b in ours if b["minutes"] == e["minutes"]), None)
        if base is None or base is e:
            continue
        parts = []
        for space in SPACES:
            a, b = e[space]["fid"], base[space]["fid"]
            if a["max"] is None or b["max"] is None:
                parts.append(f"{space}: n/a")
                continue
            overlap = a["min"] <= b["max"] and b["min"] <= a["max"]
            parts.append(
                f"{space}: {'within noise' if overlap else 'apart'} ([{a['min']:.3f}, {a['max']:.3f}] vs "
                f"[{b['min']:.3f}, {b['max']:.3f}])"
            )
        lines.append(f"{e['run']} against {base['run']}, {e['minutes']:g} min: " + "; ".join(parts))
    return lines


# -------------------------------------------------------------------------------------------------- main
def minutes_list(text: str) -> list[float]:
    return [float(m) for m in text.split(",") if m.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ours",
        nargs="*",
        default=["precision=fp32", "precision=bf16"],
        help='ddpm settings, each "default" or space-separated ddpm-train overrides, e.g. "precision=bf16"',
    )
    parser.add_argument("--ours-minutes", default="5", help="comma-separated training budgets of ddpm")
    parser.add_argument(
        "--ours-overrides",
        "--override",
        nargs="+",
        action="extend",
        default=[],
        help="ddpm-train overrides applied to every ddpm setting",
    )
    parser.add_argument(
        "--reference",
        nargs="*",
        default=["mults=1-2-4", "mults=1-2"],
        help='GaussianDiffusion settings, each "dim=32,mults=1-2-4,lr=1e-3,batch=128" (keys left out: these)',
    )
    parser.add_argument("--reference-minutes", default="10", help="comma-separated training budgets")
    parser.add_argument(
        "--reference-sampling-steps",
        default="100,250",
        help=f"comma-separated sampling_timesteps, each a row of the same trained model (DDIM below "
        f"{REFERENCE_T}, ancestral at {REFERENCE_T})",
    )
    parser.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds: every setting runs once per seed"
    )
    parser.add_argument("--n", type=int, default=1000, help="samples scored per run")
    parser.add_argument(
        "--n-real", type=int, default=None, help="real digits scored against (default 1,797 - n)"
    )
    parser.add_argument(
        "--eval-overrides", nargs="+", default=[], help="ddpm-eval scoring keys, e.g. knn_k=5"
    )
    parser.add_argument("--out", default="runs/quality_digits")
    args = parser.parse_args()

    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    ours_minutes, ref_minutes = minutes_list(args.ours_minutes), minutes_list(args.reference_minutes)
    references = [ReferenceSetting.parse(text) for text in args.reference]
    ref_steps = [int(s) for s in args.reference_sampling_steps.split(",") if s.strip()]
    if any(not 1 <= s <= REFERENCE_T for s in ref_steps):
        raise SystemExit(f"--reference-sampling-steps must lie in [1, {REFERENCE_T}]: {ref_steps}")
    if not seeds:
        raise SystemExit("--seeds names no seed")
    register_configs()
    for setting in args.ours:  # every config is checked before any training
        ours_config(setting, args.ours_overrides, seeds[0])
    if references and ref_minutes:
        import denoising_diffusion_pytorch  # noqa: F401 (pip install -e '.[bench]'), before any training

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer, size = eval_scorer(args.n, args.n_real, args.eval_overrides)
    n_real = scorer.n_real
    floor = floor_of(scorer)
    accuracy = scorer.spaces["classifier"].about["classifier_accuracy"]
    dataset = build_dataset(real_data_config(scorer.data))
    images, _ = load_subset(dataset, size, seed=0)  # the training data: all the digits
    jobs = len(seeds) * (len(args.ours) * len(ours_minutes) + len(references) * len(ref_minutes))
    budget = len(seeds) * (len(args.ours) * sum(ours_minutes) + len(references) * sum(ref_minutes))
    print(
        f"classifier held-out accuracy {accuracy:.1%}; {args.n:,} samples per run against {n_real:,} of the "
        f"{size:,} digits (8x8); CPU threads {torch.get_num_threads()}; {jobs} trainings, {budget:g} min of "
        "training in all, plus sampling",
        flush=True,
    )
    if floor is not None:
        text = ", ".join(
            f"{s} {floor[s]['fid']:.3f}" if floor[s]["fid"] is not None else f"{s} n/a" for s in SPACES
        )
        print(f"real vs real ({args.n:,} other digits): FID {text}", flush=True)
    else:
        print(f"no real-vs-real floor: {n_real:,} + {args.n:,} is more than the {size:,} digits", flush=True)

    rows: list[dict] = []

    def record(row: dict, samples: torch.Tensor) -> None:
        row["scores"] = scores_of(scorer, samples)
        rows.append(row)
        if row["seed"] == seeds[0]:
            save_grid(samples[:64], out / f"{slug(row['run'])}_{row['minutes']:g}min_seed{row['seed']}.png")
        c, p = row["scores"]["classifier"], row["scores"]["pixels"]
        fids = " | ".join(
            f"FID {name} {s['fid']:.3f}" if s["fid"] is not None else f"FID {name} n/a"
            for name, s in (("classifier", c), ("pixels", p))
        )
        print(
            f"{row['run']:>44} {row['minutes']:4g} min seed {row['seed']}: {row['steps']:6d} steps | "
            f"{fids} | precision {c['precision']:.3f} | recall {c['recall']:.3f} | "
            f"sampling {row['sample_s']:.0f} s",
            flush=True,
        )
        write_report(out, args, accuracy, n_real, floor, rows)

    for seed in seeds:  # seed outermost: an interrupted run still has every setting at the first seeds
        for setting in args.ours:
            cfg = ours_config(setting, args.ours_overrides, seed)
            label = f"ddpm {setting}"
            for minutes in ours_minutes:
                trained, info = ours_train(cfg, minutes, images)
                samples, sample_s = ours_sample(cfg, trained, args.n, seed)
                row = {"run": label, "impl": "ddpm", "setting": setting, "minutes": minutes, "seed": seed}
                record({**row, **info, "sample_s": sample_s}, samples)
        for ref in references:
            for minutes in ref_minutes:
                diffusion, info = reference_train(ref, minutes, images, seed)
                for steps in ref_steps:
                    samples, sample_s = reference_sample(diffusion, steps, args.n, seed)
                    sampler = reference_sampler(steps)
                    row = {
                        "run": f"lucidrains {ref.describe()}, {sampler}",
                        "impl": "lucidrains",
                        "setting": {
                            "dim": ref.dim,
                            "mults": list(ref.mults),
                            "lr": ref.lr,
                            "batch": ref.batch,
                        },
                        "minutes": minutes,
                        "seed": seed,
                        "sampling_timesteps": steps,
                        "sampler": sampler,
                    }
                    record({**row, **info, "sample_s": sample_s}, samples)

    report = write_report(out, args, accuracy, n_real, floor, rows)
    print()
    print("\n".join(report["table"]))
    print()
    print("\n".join(report["verdicts"]))


def write_report(
    out: Path, args: argparse.Namespace, accuracy: float, n_real: int, floor: dict | None, rows: list[dict]
) -> dict:
    """<out>/quality.json (every run, the summary, the table and the verdicts) and <out>/quality.md."""
    summary = summarise(rows)
    lines = table(summary, floor, args.n, n_real)
    verdict = verdicts(summary)
    report = {
        "command": " ".join(sys.argv),
        "protocol": {
            "n": args.n,
            "n_real": n_real,
            "features": list(SPACES),
            "classifier_accuracy": accuracy,
            "threads": torch.get_num_threads(),
            "seeds": [int(s) for s in args.seeds.split(",") if s.strip()],
        },
        "floor": floor,
        "summary": summary,
        "table": lines,
        "verdicts": verdict,
        "runs": rows,
    }
    (out / "quality.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "quality.md").write_text("\n".join([*lines, "", *verdict]) + "\n")
    return report


if __name__ == "__main__":
    main()
