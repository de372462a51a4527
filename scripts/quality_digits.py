"""Time to quality on the embedded digits: train for a fixed wall-clock time, draw --n samples and score
them as ddpm-eval does, in the digit classifier's features and in raw pixels, for ddpm's recipe (one or more
settings) and for denoising-diffusion-pytorch's GaussianDiffusion (the bench extra, one or more U-Nets,
each trained model sampled with each of its sampling_timesteps), every setting once per seed; and the same
for class-conditional models with classifier-free guidance: ddpm's (a setting with class_cond=true) against
the package's classifier_free_guidance module (--reference-cfg), each conditional row also scored by its
class accuracy.

    python scripts/quality_digits.py --ours default --ours-minutes 0 \\
        --reference dim=32,mults=1-2-4,lr=1e-3 --reference-minutes 10 --reference-sampling-steps 250 \\
        --seeds 0,1,2

    python scripts/quality_digits.py --ours default class_cond=true --guidance 1,1.5,2,3 --ours-minutes 0 \\
        --reference --reference-cfg mults=1-2 --reference-cfg-minutes 5 --reference-cond-scales 6,3,1.5 \\
        --seeds 0,1,2

    python scripts/quality_digits.py --ours default learn_sigma=true --ours-minutes 5 \\
        --ours-overrides lr_decay=none --reference --variances small,large,learned \\
        --sample-steps 10,25,50,all --bpd 500 --seeds 0,1,2

--ours-minutes 0 (the default) trains the config's steps, as ddpm-train runs the job; a budget in minutes
needs lr_decay=none (the default's cosine decay needs a step count).

ddpm trains as ddpm-train does (fused Adam with the lr in a device tensor, the EMA written by at/apply,
the U-Net under the config's precision and compile as the Runtime resolves them on the CPU), on random
batches of all 1,797 digits. A setting with class_cond=true trains on their labels (cond_drop_prob of them
replaced by the null label) and is sampled at each --guidance scale, one row each of the same trained
model. A seed changes the initial weights, the batches, t and eps, and the sampling noise. Budgets count
training only; sampling and scoring are timed separately. With --variances and --sample-steps each
trained ddpm model is sampled by Algorithm 2 at every variance of its kind (small and large for a
fixed-variance setting, learned for a learn_sigma=true one) and step count, one row each, and each
learned row is set against the fixed rows at its step count; with --bpd it is also bounded in bits/dim at
each of those variances on --bpd of the training digits (the digits have no test split), over all T.

The conditional reference is classifier_free_guidance's Unet(dim, dim_mults, num_classes=10) and its
GaussianDiffusion at their defaults (labels dropped with p=0.5, T=1000, cosine schedule, eps-prediction),
trained with the unconditional reference's Adam and EMA for --reference-cfg-minutes, and sampled with
DDIM (its eta of 1) in --reference-cfg-sampling-steps at each --reference-cond-scales scale (rescaled_phi
0.7, its sample's default), one row each. A scale at which its sampler raises (cond_scale=1 in 2.3.4) is
a failed row: no scores, and the error.

Scoring is ddpm-eval's (its Scorer, its cached classifier): --n generated images against --n-real real
digits (default: 1,797 - n), and the floor, --n other real digits against the same reals (what a perfect
model scores at this many images). At each seed the conditional models, ddpm's and the reference's alike,
are asked for the labels of --n real digits drawn with that seed; class accuracy is the share of samples
the classifier assigns to the asked-for class, and the real digits' own accuracy is its ceiling. The table
gives the median over seeds and the [min, max] range. "beats ... by more than the spread" means ddpm's
worst seed scores better than every reference row's best seed (a lower FID; for conditional rows against
the conditional reference, also a higher class accuracy); each conditional ddpm row is also set against
the unconditional ddpm rows at its budget: does its median class accuracy reach 0.98 with median FIDs no
worse? Results go to <out>/quality.json and <out>/quality.md, and a grid of each run's first 64 samples to
<out>.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_module
from omegaconf import DictConfig
from quality_report import ACCURACY_TARGET, SPACES, ceiling_text, slug, write_report

from ddpm.config import register_configs, train_config
from ddpm.data import build_dataset, load_subset
from ddpm.data.batch import Batch
from ddpm.diffusion.gaussian import Diffusion, Variance
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.evaluation.evaluate import Scorer, class_accuracy, real_data_config, score
from ddpm.evaluation.nll import BoundSet, nll_images
from ddpm.images import save_grid
from ddpm.models import build_model
from ddpm.runtime import Runtime, seed_everything
from ddpm.trained import TrainedModel
from ddpm.training.accel import prepare_net
from ddpm.training.ema import EMA
from ddpm.training.setup import sampling_model
from ddpm.training.step import LRDecay, StepOptions, TrainStep, build_optimizer

SAMPLE_BATCH = 250
REFERENCE_T = 1000  # GaussianDiffusion's training timesteps (its default, in both modules)
REFERENCE_CFG_PHI = 0.7  # classifier_free_guidance's sample(rescaled_phi=...) default
WARNED: set[tuple[str, str]] = set()  # the scoring warnings printed so far


# ------------------------------------------------------------------------------------------------- ddpm
def ours_config(setting: str, common: list[str], seed: int, budgets: list[float]) -> DictConfig:
    """ddpm-train's checked config for one setting ("default", or space-separated overrides) and seed."""
    overrides = [] if setting == "default" else setting.split()
    cfg = train_config(["device=cpu", *common, *overrides, f"seed={seed}"])
    if cfg.lr_decay is not LRDecay.none and any(m > 0 for m in budgets):
        raise SystemExit(
            f"{setting!r}: lr_decay={cfg.lr_decay.name} needs a step count; a budget in minutes has none "
            "(--ours-minutes 0 trains the config's steps)"
        )
    return cfg


def check_guidance(setting: str, cfg: DictConfig, scales: list[float]) -> None:
    """A conditional setting's --guidance scales: guidance other than 1 needs the null label trained."""
    if not scales:
        raise SystemExit(f"{setting!r} is class-conditional: --guidance names no scale")
    if cfg.cond_drop_prob == 0 and any(s != 1 for s in scales):
        raise SystemExit(
            f"{setting!r}: cond_drop_prob=0 trains no null label, so only --guidance 1 works: {scales}"
        )


def ours_train(
    cfg: DictConfig,
    minutes: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: tuple[str, ...],
) -> tuple[TrainedModel, dict]:
    """ddpm-train's step (TrainStep, eager) on random batches of ``images`` for ``minutes``, with their
    ``labels`` where cfg.class_cond; ``minutes`` 0: for the config's ``steps``, the job as ddpm-train runs
    it (its learning-rate schedule included). Its learning rate warms up as lr_warmup says; with a budget
    in minutes, lr_decay=none, since a time budget has no step count to decay over."""
    dev = torch.device("cpu")
    runtime = Runtime.resolved(dev, cfg.precision, cfg.compile, cuda_graph=False)
    seed_everything(cfg.seed)
    names = class_names if cfg.class_cond else None
    num_classes = len(names) if names is not None else None
    diffusion = Diffusion.from_config(cfg)
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size, num_classes, cfg.learn_sigma)
    optimizer = build_optimizer(model, cfg.lr, dev)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    net = prepare_net(model, runtime)  # after the EMA copy: the EMA averages the plain module's weights
    opts = StepOptions.from_config(cfg, num_classes)
    train_step = TrainStep(model, net, optimizer, diffusion, ema, opts, runtime)
    g = torch.Generator().manual_seed(cfg.seed)
    nonfinite = torch.zeros((), dtype=torch.int64)
    model.train()
    start, step = time.perf_counter(), 0
    while (time.perf_counter() - start < minutes * 60) if minutes > 0 else step < cfg.steps:
        step += 1
        index = torch.randint(0, images.shape[0], (cfg.batch_size,), generator=g)
        batch = Batch(images[index], labels[index] if names is not None else None)
        nonfinite += ~train_step(step, batch)["finite"]
    train_s = time.perf_counter() - start
    trained = sampling_model(cfg, diffusion, model, ema, step, names)
    info = {
        "steps": step,
        "train_s": train_s,
        "nonfinite_steps": int(nonfinite),
        "runtime": runtime.describe(),
        "sampler": f"{cfg.sampler}, {SamplingOptions.from_config(cfg).steps(cfg.timesteps)} steps",
    }
    return trained, info


def ours_sample(
    sampling: SamplingOptions,
    trained: TrainedModel,
    n: int,
    seed: int,
    labels: torch.Tensor | None = None,
    guidance: float | None = None,
) -> tuple[torch.Tensor, float]:
    """n samples, given ``labels`` at ``guidance`` where the model is conditional."""
    if guidance is not None:
        sampling = replace(sampling, guidance_scale=guidance)
    start = time.perf_counter()
    samples = generate(trained, sampling, n, seed, SAMPLE_BATCH, labels)
    return samples, time.perf_counter() - start


@dataclass(frozen=True)
class SamplerRow:
    """One way of sampling a trained ddpm model: its options and the suffix its row's name gets."""

    sampling: SamplingOptions
    label: str = ""


def sampler_rows(cfg: DictConfig, variances: list[Variance], steps: list[int | None]) -> list[SamplerRow]:
    """The setting's own sampler, or with --variances / --sample-steps the ddpm sampler at each variance
    the model has (small and large for a fixed-variance model, learned for a learn_sigma one) and each step
    count (None: all T)."""
    own = SamplingOptions.from_config(cfg)
    if not variances and not steps:
        return [SamplerRow(own)]
    kinds = [resolve_kind(v, cfg.learn_sigma) for v in variances or [own.ddpm_variance]]
    rows = []
    for variance in dict.fromkeys(v for v in kinds if v is not None):
        for n in steps or [own.sample_steps]:
            options = replace(own, sampler="ddpm", ddpm_variance=variance, sample_steps=n)
            count = options.steps(cfg.timesteps)
            rows.append(SamplerRow(options, f", {variance.value} variance, {count} steps"))
    return rows


def resolve_kind(variance: Variance, learn_sigma: bool) -> Variance | None:
    """The variance a model is sampled and bounded with for a --variances entry, or None where it is not
    the model's kind: learned for a learn_sigma model (auto too), small or large for a fixed one."""
    if variance is Variance.auto:
        return Variance.learned if learn_sigma else Variance.small
    return variance if (variance is Variance.learned) == learn_sigma else None


def ours_bound(
    trained: TrainedModel, bound_set: BoundSet, variance: Variance, seed: int
) -> tuple[dict[str, Any], float]:
    """The bits/dim of ``trained`` on the --bpd digits with ``variance``, and its seconds."""
    start = time.perf_counter()
    report = replace(bound_set, variance=variance).report(trained, SAMPLE_BATCH, seed)
    return report, time.perf_counter() - start


# -------------------------------------------------------------------------------------------- reference
@dataclass(frozen=True)
class ReferenceSetting:
    """GaussianDiffusion's U-Net and optimiser: Unet(dim, dim_mults), Adam(lr), ``batch`` images a step."""

    dim: int = 32
    mults: tuple[int, ...] = (1, 2, 4)
    lr: float = 1e-3
    batch: int = 128

    @classmethod
    def parse(cls, text: str, option: str = "--reference") -> ReferenceSetting:
        """ "dim=32,mults=1-2,lr=1e-3,batch=128"; keys left out keep their defaults."""
        values: dict[str, Any] = {}
        for item in filter(None, text.split(",")):
            key, sep, value = item.partition("=")
            if not sep or key not in ("dim", "mults", "lr", "batch"):
                raise SystemExit(f"{option} {text!r}: {item!r} is not dim=, mults=, lr= or batch=")
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

    def record(self) -> dict[str, Any]:
        return {"dim": self.dim, "mults": list(self.mults), "lr": self.lr, "batch": self.batch}


def reference_fit(
    diffusion: torch.nn.Module,
    setting: ReferenceSetting,
    minutes: float,
    images: torch.Tensor,
    seed: int,
    labels: torch.Tensor | None = None,
) -> tuple[torch.nn.Module, dict]:
    """Adam(lr) on random batches of ``images`` (with their ``labels``, for the conditional module) for
    ``minutes``, with the EMA the package's Trainer keeps (0.995 every 10 steps); returns the EMA copy."""
    from ema_pytorch import EMA as RefEMA

    ema = RefEMA(diffusion, beta=0.995, update_every=10)
    opt = torch.optim.Adam(diffusion.parameters(), lr=setting.lr)
    data = (images + 1) / 2  # it takes [0, 1] and normalises itself
    g = torch.Generator().manual_seed(seed)
    start, step = time.perf_counter(), 0
    while time.perf_counter() - start < minutes * 60:
        index = torch.randint(0, data.shape[0], (setting.batch,), generator=g)
        cond = {"classes": labels[index]} if labels is not None else {}
        loss = diffusion(data[index], **cond)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update()
        step += 1
    return ema.ema_model.eval(), {"steps": step, "train_s": time.perf_counter() - start}


def reference_train(
    setting: ReferenceSetting, minutes: float, images: torch.Tensor, seed: int
) -> tuple[torch.nn.Module, dict]:
    """GaussianDiffusion with its own defaults (T=1000, sigmoid schedule, v-prediction), trained for
    ``minutes``; returns the EMA copy."""
    from denoising_diffusion_pytorch import GaussianDiffusion, Unet

    torch.manual_seed(seed)  # its init, and the t and noise it draws from the global generator
    unet = Unet(dim=setting.dim, dim_mults=setting.mults, channels=images.shape[1], flash_attn=False)
    diffusion = GaussianDiffusion(unet, image_size=images.shape[-1], timesteps=REFERENCE_T)
    return reference_fit(diffusion, setting, minutes, images, seed)


def reference_cfg_train(
    setting: ReferenceSetting,
    minutes: float,
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    seed: int,
) -> tuple[torch.nn.Module, dict]:
    """classifier_free_guidance's Unet and GaussianDiffusion at their defaults (cond_drop_prob 0.5, T=1000,
    cosine schedule, eps-prediction), trained on the labelled digits for ``minutes``; returns the EMA copy."""
    from denoising_diffusion_pytorch.classifier_free_guidance import GaussianDiffusion, Unet

    torch.manual_seed(seed)  # its init, and the t, noise and dropped labels it draws globally
    unet = Unet(dim=setting.dim, dim_mults=setting.mults, num_classes=num_classes, channels=images.shape[1])
    diffusion = GaussianDiffusion(unet, image_size=images.shape[-1], timesteps=REFERENCE_T)
    ema_model, info = reference_fit(diffusion, setting, minutes, images, seed, labels)
    defaults = {"cond_drop_prob": unet.cond_drop_prob, "objective": diffusion.objective}
    return ema_model, {**info, **defaults, "ddim_eta": diffusion.ddim_sampling_eta}


def reference_draw(
    diffusion: Any, steps: int, n: int, seed: int, draw: Callable[[int, int], torch.Tensor]
) -> tuple[torch.Tensor, float]:
    """n samples in [-1, 1], ``draw(start, size)`` a batch at a time, with ``steps`` sampling_timesteps:
    DDIM below T, its ancestral sampler at T (as GaussianDiffusion chooses from its constructor's
    sampling_timesteps)."""
    diffusion.sampling_timesteps = steps
    diffusion.is_ddim_sampling = steps < diffusion.num_timesteps
    torch.manual_seed(seed)
    start = time.perf_counter()
    with contextlib.redirect_stderr(io.StringIO()):  # its tqdm bar per sampling batch
        samples = torch.cat([draw(i, min(SAMPLE_BATCH, n - i)) for i in range(0, n, SAMPLE_BATCH)])
    return samples.clone() * 2 - 1, time.perf_counter() - start


def reference_sample(diffusion: Any, steps: int, n: int, seed: int) -> tuple[torch.Tensor, float]:
    return reference_draw(diffusion, steps, n, seed, lambda i, b: diffusion.sample(batch_size=b))


def reference_cfg_sample(
    diffusion: Any, steps: int, scale: float, labels: torch.Tensor, seed: int
) -> tuple[torch.Tensor | None, float, str | None]:
    """Samples of the conditional reference given ``labels`` at cond_scale ``scale``, the seconds taken,
    and the error where its sampler raised (samples None)."""

    def draw(i: int, b: int) -> torch.Tensor:
        classes = labels[i : i + b]
        return diffusion.sample(classes=classes, cond_scale=scale, rescaled_phi=REFERENCE_CFG_PHI)

    start = time.perf_counter()
    try:
        samples, sample_s = reference_draw(diffusion, steps, labels.shape[0], seed, draw)
    except Exception as e:  # its own failure at this scale (cond_scale=1 in 2.3.4): a row, not the end
        return None, time.perf_counter() - start, f"{type(e).__name__}: {e}"
    return samples, sample_s, None


def reference_sampler(steps: int) -> str:
    return f"ddim, {steps} steps" if steps < REFERENCE_T else f"ancestral, {steps} steps"


# ------------------------------------------------------------------------------------------------ scores
def eval_scorer(n: int, n_real: int | None, overrides: list[str]) -> tuple[Scorer, int]:
    """ddpm-eval's Scorer for the digits, in SPACES, read with the labels (the same images, and the class
    accuracy of conditional rows); n_real defaults to the digits not needed for the floor (the --n other
    real digits scored the same way)."""
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
    return Scorer(cfg, real_data_config(cfg.data), torch.device("cpu"), labels=True), size


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


def accuracy_of(scorer: Scorer, fake: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """The share of ``fake`` the classifier assigns to the asked-for ``labels``, in all and per class."""
    assert scorer.classifier is not None and scorer.class_names is not None
    accuracy, per_class = class_accuracy(scorer.classifier[0], fake.clamp(-1, 1), labels, scorer.class_names)
    return {"class_accuracy": accuracy, "class_accuracy_per_class": per_class}


def floor_of(scorer: Scorer) -> dict[str, dict] | None:
    """The real-vs-real scores: the Scorer's other real digits against its reals (None if the set has too
    few digits for both)."""
    if any(space.other is None for space in scorer.spaces.values()):
        return None
    return {name: score(space.real, space.other, scorer.cfg)[0] for name, space in scorer.spaces.items()}


# -------------------------------------------------------------------------------------------------- plan
def minutes_list(text: str) -> list[float]:
    return [float(m) for m in text.split(",") if m.strip()]


def scales_list(text: str, option: str) -> list[float]:
    scales = [float(s) for s in text.split(",") if s.strip()]
    if any(not math.isfinite(s) or s < 0 for s in scales):
        raise SystemExit(f"{option} must be finite numbers >= 0: {scales}")
    return scales


def steps_list(text: str, option: str) -> list[int]:
    steps = [int(s) for s in text.split(",") if s.strip()]
    if any(not 1 <= s <= REFERENCE_T for s in steps):
        raise SystemExit(f"{option} must lie in [1, {REFERENCE_T}]: {steps}")
    return steps


def variances_list(text: str) -> list[Variance]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    valid = ", ".join(v.value for v in Variance)
    for name in names:
        if name not in Variance.__members__:
            raise SystemExit(f"--variances: {name!r} is not a variance; choose from {valid}")
    return [Variance(name) for name in names]


def sample_steps_list(text: str) -> list[int | None]:
    """--sample-steps: step counts, "all" for all T."""
    steps: list[int | None] = []
    for item in (s.strip() for s in text.split(",") if s.strip()):
        if item == "all":
            steps.append(None)
        elif not item.isdigit() or int(item) < 1:
            raise SystemExit(f"--sample-steps: {item!r} is neither a step count >= 1 nor all")
        else:
            steps.append(int(item))
    return steps


@dataclass(frozen=True)
class Plan:
    """The command line, parsed and checked before any training."""

    seeds: list[int]
    ours_minutes: list[float]
    guidance: list[float]
    references: list[ReferenceSetting]
    ref_minutes: list[float]
    ref_steps: list[int]
    cfg_references: list[ReferenceSetting]
    cfg_minutes: list[float]
    cfg_steps: list[int]
    cond_scales: list[float]
    variances: list[Variance]
    sample_steps: list[int | None]
    bpd: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not seeds:
            raise SystemExit("--seeds names no seed")
        plan = cls(
            seeds,
            minutes_list(args.ours_minutes),
            scales_list(args.guidance, "--guidance"),
            [ReferenceSetting.parse(text) for text in args.reference],
            minutes_list(args.reference_minutes),
            steps_list(args.reference_sampling_steps, "--reference-sampling-steps"),
            [ReferenceSetting.parse(text, "--reference-cfg") for text in args.reference_cfg],
            minutes_list(args.reference_cfg_minutes),
            steps_list(args.reference_cfg_sampling_steps, "--reference-cfg-sampling-steps"),
            scales_list(args.reference_cond_scales, "--reference-cond-scales"),
            variances_list(args.variances),
            sample_steps_list(args.sample_steps),
            args.bpd,
        )
        if plan.bpd < 0:
            raise SystemExit(f"--bpd must be >= 0 (0: no bound): {plan.bpd}")
        if plan.cfg_references and plan.cfg_minutes and not plan.cond_scales:
            raise SystemExit("--reference-cfg is given but --reference-cond-scales names no scale")
        return plan

    def trainings(self, ours: int) -> tuple[int, float]:
        """How many trainings per seed all settings make, and their minutes, for ``ours`` ddpm settings."""
        jobs = (
            ours * len(self.ours_minutes)
            + len(self.references) * len(self.ref_minutes)
            + len(self.cfg_references) * len(self.cfg_minutes)
        )
        minutes = (
            ours * sum(self.ours_minutes)
            + len(self.references) * sum(self.ref_minutes)
            + len(self.cfg_references) * sum(self.cfg_minutes)
        )
        return jobs, minutes


# ------------------------------------------------------------------------------------------------ record
@dataclass
class Recorder:
    """Scores each run as it ends, prints its line, saves the first seed's grid and rewrites the report, so
    an interrupted measurement keeps every run so far."""

    scorer: Scorer
    out: Path
    args: argparse.Namespace
    protocol: dict
    floor: dict | None
    first_seed: int
    rows: list[dict] = field(default_factory=list)
    bounds: list[dict] = field(default_factory=list)

    def __call__(self, row: dict, samples: torch.Tensor | None, labels: torch.Tensor | None = None) -> None:
        """``samples`` None: a failed run (its row holds the error)."""
        row["scores"] = scores_of(self.scorer, samples) if samples is not None else None
        if row["conditional"]:
            row.update(
                accuracy_of(self.scorer, samples, labels)
                if samples is not None and labels is not None
                else {"class_accuracy": None, "class_accuracy_per_class": None}
            )
        self.rows.append(row)
        if samples is not None and row["seed"] == self.first_seed:
            grid = f"{slug(row['run'])}_{row['minutes']:g}min_seed{row['seed']}.png"
            save_grid(samples[:64], self.out / grid)
        print(f"{row['run']:>44} {row['minutes']:4g} min seed {row['seed']}: {row_text(row)}", flush=True)
        self.write()

    def write(self) -> dict:
        return write_report(self.out, self.args, self.protocol, self.floor, self.rows, self.bounds)

    def bound(self, row: dict) -> None:
        """A bound's row: printed and written at once, as a run's."""
        self.bounds.append(row)
        se = f" +- {row['bpd_se']:.3f}" if row["bpd_se"] is not None else ""
        print(
            f"{row['run']:>44} {row['minutes']:4g} min seed {row['seed']}: {row['variance']} variance "
            f"{row['bpd']:.3f}{se} bits/dim on {row['n']} digits | {row['seconds']:.0f} s",
            flush=True,
        )
        self.write()


def row_text(row: dict) -> str:
    text = f"{row['steps']:6d} steps | "
    if row["scores"] is None:
        return text + f"failed: {row['error']} | sampling {row['sample_s']:.0f} s"
    c, p = row["scores"]["classifier"], row["scores"]["pixels"]
    if c["precision"] is None:  # the scorer's answer to NaN samples (a diverged model)
        return text + f"non-finite samples, no scores | sampling {row['sample_s']:.0f} s"
    fids = " | ".join(
        f"FID {name} {s['fid']:.3f}" if s["fid"] is not None else f"FID {name} n/a"
        for name, s in (("classifier", c), ("pixels", p))
    )
    accuracy = f" | class accuracy {row['class_accuracy']:.3f}" if row["conditional"] else ""
    return (
        f"{text}{fids}{accuracy} | precision {c['precision']:.3f} | recall {c['recall']:.3f} | "
        f"sampling {row['sample_s']:.0f} s"
    )


# ---------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Data:
    """The training digits (all of them) with their labels, the class names, and the digits the bound
    is measured on (--bpd of the training digits; None without --bpd)."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    bound_set: BoundSet | None


def run_ours(record: Recorder, args: argparse.Namespace, plan: Plan, data: Data, seed: int) -> None:
    """Every ddpm setting at every budget: one row per sampler row (--variances x --sample-steps, or the
    setting's own), each once per --guidance scale for a conditional setting; and with --bpd, the bound at
    each of its variances."""
    for setting in args.ours:
        cfg = ours_config(setting, args.ours_overrides, seed, plan.ours_minutes)
        base = {"run": f"ddpm {setting}", "impl": "ddpm", "setting": setting, "conditional": cfg.class_cond}
        rows = sampler_rows(cfg, plan.variances, plan.sample_steps)
        for minutes in plan.ours_minutes:
            trained, info = ours_train(cfg, minutes, data.images, data.labels, data.class_names)
            asked = record.scorer.draw_labels(args.n, seed) if cfg.class_cond else None  # same for all
            for sampler in rows:
                row = {**base, "run": base["run"] + sampler.label, "minutes": minutes, "seed": seed, **info}
                if sampler.label:
                    row["sampler"] = f"ddpm, {sampler.sampling.steps(cfg.timesteps)} steps"
                    row["variance"] = sampler.sampling.ddpm_variance.value
                    row["sample_steps"] = sampler.sampling.steps(cfg.timesteps)
                if not cfg.class_cond:
                    samples, sample_s = ours_sample(sampler.sampling, trained, args.n, seed)
                    record({**row, "sample_s": sample_s}, samples)
                    continue
                for scale in plan.guidance:
                    samples, sample_s = ours_sample(sampler.sampling, trained, args.n, seed, asked, scale)
                    guided = {
                        **row,
                        "run": f"{row['run']}, guidance {scale:g}",
                        "guidance_scale": scale,
                        "cond_drop_prob": cfg.cond_drop_prob,
                    }
                    record({**guided, "sample_s": sample_s}, samples, asked)
            if data.bound_set is None:
                continue
            for variance in dict.fromkeys(r.sampling.ddpm_variance for r in rows):
                variance = resolve_kind(Variance(variance), cfg.learn_sigma)
                assert variance is not None
                nll, seconds = ours_bound(trained, data.bound_set, variance, seed)
                record.bound({**base, "minutes": minutes, "seed": seed, **nll, "seconds": seconds})


def run_references(record: Recorder, args: argparse.Namespace, plan: Plan, data: Data, seed: int) -> None:
    """Every unconditional reference at every budget, one row per sampling_timesteps."""
    for ref in plan.references:
        for minutes in plan.ref_minutes:
            diffusion, info = reference_train(ref, minutes, data.images, seed)
            for steps in plan.ref_steps:
                samples, sample_s = reference_sample(diffusion, steps, args.n, seed)
                sampler = reference_sampler(steps)
                row = {
                    "run": f"lucidrains {ref.describe()}, {sampler}",
                    "impl": "lucidrains",
                    "setting": ref.record(),
                    "conditional": False,
                    "minutes": minutes,
                    "seed": seed,
                    "sampling_timesteps": steps,
                    "sampler": sampler,
                }
                record({**row, **info, "sample_s": sample_s}, samples)


def run_cfg_references(record: Recorder, args: argparse.Namespace, plan: Plan, data: Data, seed: int) -> None:
    """Every conditional reference at every budget, one row per (sampling_timesteps, cond_scale)."""
    if not plan.cfg_references:
        return
    asked = record.scorer.draw_labels(args.n, seed)  # the same labels for every model at this seed
    for ref in plan.cfg_references:
        for minutes in plan.cfg_minutes:
            diffusion, info = reference_cfg_train(
                ref, minutes, data.images, data.labels, len(data.class_names), seed
            )
            for steps in plan.cfg_steps:
                sampler = reference_sampler(steps)
                for scale in plan.cond_scales:
                    samples, sample_s, error = reference_cfg_sample(diffusion, steps, scale, asked, seed)
                    row = {
                        "run": f"lucidrains cfg {ref.describe()}, {sampler}, cond_scale {scale:g}",
                        "impl": "lucidrains",
                        "setting": ref.record(),
                        "conditional": True,
                        "minutes": minutes,
                        "seed": seed,
                        "sampling_timesteps": steps,
                        "sampler": sampler,
                        "cond_scale": scale,
                        "rescaled_phi": REFERENCE_CFG_PHI,
                    }
                    failed = {"error": error} if error is not None else {}
                    record({**row, **info, "sample_s": sample_s, **failed}, samples, asked)


# -------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--ours",
        nargs="*",
        default=["precision=fp32", "precision=bf16"],
        help='ddpm settings, each "default" or space-separated ddpm-train overrides, e.g. "precision=bf16" '
        'or "class_cond=true"',
    )
    parser.add_argument(
        "--ours-minutes",
        default="0",
        help="comma-separated training budgets of ddpm in minutes; 0 (default): the config's steps, as "
        "ddpm-train runs the job (a budget in minutes needs lr_decay=none)",
    )
    parser.add_argument(
        "--ours-overrides",
        "--override",
        nargs="+",
        action="extend",
        default=[],
        help="ddpm-train overrides applied to every ddpm setting",
    )
    parser.add_argument(
        "--guidance",
        default="1,1.5,2,3",
        help="comma-separated guidance scales, each a row of every class_cond=true setting's trained model "
        "(1: the conditional model alone)",
    )
    parser.add_argument(
        "--variances",
        default="",
        help="comma-separated ddpm_variance values: every ddpm setting is sampled with the ddpm sampler at "
        "each variance of its kind (small, large: fixed-variance settings; learned: learn_sigma=true ones; "
        "auto: the setting's own) and each --sample-steps, one row each (default: the setting's sampler)",
    )
    parser.add_argument(
        "--sample-steps",
        default="",
        help='comma-separated step counts of those rows, "all" for all T (default: the setting\'s)',
    )
    parser.add_argument(
        "--bpd",
        type=int,
        default=0,
        help="bits/dim of every trained ddpm model at each of its --variances, on this many training "
        "digits (picked with seed 0; the digits have no test split), over all T steps (0: none)",
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
        "--reference-cfg",
        nargs="*",
        default=[],
        help="classifier_free_guidance settings, as --reference's (Unet(dim, dim_mults, num_classes=10)); "
        "default none",
    )
    parser.add_argument("--reference-cfg-minutes", default="10", help="comma-separated training budgets")
    parser.add_argument(
        "--reference-cfg-sampling-steps",
        default="100",
        help="comma-separated sampling_timesteps of the conditional reference, as --reference-sampling-steps",
    )
    parser.add_argument(
        "--reference-cond-scales",
        default="6,3,1.5",
        help="comma-separated cond_scale values, each a row of every trained conditional reference",
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
    return parser.parse_args()


def check_settings(args: argparse.Namespace, plan: Plan) -> None:
    """Every ddpm config (and a conditional one's guidance scales), and the reference package, before any
    training."""
    register_configs()
    for setting in args.ours:
        cfg = ours_config(setting, args.ours_overrides, plan.seeds[0], plan.ours_minutes)
        if cfg.class_cond:
            check_guidance(setting, cfg, plan.guidance)
        if not sampler_rows(cfg, plan.variances, plan.sample_steps):
            kind = "learned (learn_sigma=true)" if cfg.learn_sigma else "small or large (fixed)"
            names = ",".join(v.value for v in plan.variances)
            raise SystemExit(f"--variances {names} names no variance of {setting!r}, whose is {kind}")
    if plan.references and plan.ref_minutes:
        import denoising_diffusion_pytorch  # noqa: F401 (pip install -e '.[bench]')
    if plan.cfg_references and plan.cfg_minutes:
        import denoising_diffusion_pytorch.classifier_free_guidance  # noqa: F401


def main() -> None:
    args = parse_args()
    plan = Plan.from_args(args)
    check_settings(args, plan)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    scorer, size = eval_scorer(args.n, args.n_real, args.eval_overrides)
    n_real = scorer.n_real
    floor = floor_of(scorer)
    accuracy = scorer.spaces["classifier"].about["classifier_accuracy"]
    dataset = build_dataset(real_data_config(scorer.data), labels=True)
    images, labels = load_subset(dataset, size, seed=0)  # the training data: all the digits
    assert labels is not None and scorer.class_names is not None
    bound_set = None
    if plan.bpd:
        bound_images, bound_labels = nll_images(real_data_config(scorer.data), "train", plan.bpd, 0, True)
        bound_set = BoundSet(bound_images, bound_labels, Variance.small, "train")
    data = Data(images, labels, scorer.class_names, bound_set)
    jobs, budget = plan.trainings(len(args.ours))
    print(
        f"classifier held-out accuracy {accuracy:.1%}; {args.n:,} samples per run against {n_real:,} of the "
        f"{size:,} digits (8x8); CPU threads {torch.get_num_threads()}; {jobs * len(plan.seeds)} trainings, "
        f"{budget * len(plan.seeds):g} min of training in all, plus sampling",
        flush=True,
    )
    ceiling = ceiling_text(scorer.real_accuracy)
    if floor is not None:
        text = ", ".join(
            f"{s} {floor[s]['fid']:.3f}" if floor[s]["fid"] is not None else f"{s} n/a" for s in SPACES
        )
        print(f"real vs real ({args.n:,} other digits): FID {text}; {ceiling}", flush=True)
    else:
        print(f"no real-vs-real floor: {n_real:,} + {args.n:,} is more than the {size:,} digits; {ceiling}")

    protocol = {
        "n": args.n,
        "n_real": n_real,
        "features": list(SPACES),
        "classifier_accuracy": accuracy,
        "real_class_accuracy": scorer.real_accuracy,
        "class_accuracy_target": ACCURACY_TARGET,
        "threads": torch.get_num_threads(),
        "seeds": plan.seeds,
    }
    record = Recorder(scorer, out, args, protocol, floor, plan.seeds[0])
    for seed in plan.seeds:  # seed outermost: an interrupted run still has every setting at the first seeds
        run_ours(record, args, plan, data, seed)
        run_references(record, args, plan, data, seed)
        run_cfg_references(record, args, plan, data, seed)

    report = record.write()
    print()
    print("\n".join(report["table"]))
    if report["bounds_table"]:
        print()
        print("\n".join(report["bounds_table"]))
    print()
    print("\n".join(report["verdicts"]))


if __name__ == "__main__":
    main()
