"""The checks each command runs on its config before any work: ranges and relations that the schemas'
types cannot express. Each group option's own checks live with its code (schedules, models, data); this
module calls them and checks the top-level keys. The first bad value raises ConfigError."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from ddpm import checks
from ddpm.data import DATASETS, Split, check_data
from ddpm.data.resident import resident_mb
from ddpm.diffusion.gaussian import Loss, Objective, Variance
from ddpm.diffusion.sampling import check_sampling
from ddpm.diffusion.schedules import check_schedule
from ddpm.errors import ConfigError
from ddpm.evaluation.features import FEATURES
from ddpm.evaluation.nll import resolve_split
from ddpm.models import check_model
from ddpm.runtime import Runtime, check_device
from ddpm.training.rundir.logger import check_logger


def check_objective(cfg: Any) -> None:
    checks.at_least("min_snr_gamma", cfg.min_snr_gamma, 0)
    checks.at_least("offset_noise", cfg.offset_noise, 0)
    checks.at_least("vlb_weight", cfg.vlb_weight, 0)
    if Loss(cfg.loss) is Loss.kl and cfg.min_snr_gamma > 0:
        raise ConfigError(
            f"min_snr_gamma={cfg.min_snr_gamma:g} weights a distance to the target, and loss=kl trains on "
            "the bound itself: choose min_snr_gamma=0 or loss=l1, l2 or huber"
        )
    for key, variance in (
        ("ddpm_variance", cfg.ddpm_variance),
        ("eval.ddpm_variance", cfg.eval.ddpm_variance),
    ):
        if Variance(variance) is Variance.learned and not cfg.learn_sigma:
            raise ConfigError(
                f"{key}=learned needs learn_sigma=true (a model that learns its variance); choose "
                f"{key}=auto, small or large, or train with learn_sigma=true"
            )
    if cfg.schedule.zero_terminal_snr and cfg.objective is Objective.eps:
        # At abar_T = 0, x_T carries no image: x_0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) is 0 / 0.
        raise ConfigError(
            "objective=eps is invalid with schedule.zero_terminal_snr=true: "
            "eps-prediction cannot recover x_0 at abar_T = 0; choose objective=v or objective=x0"
        )


def check_conditioning(cfg: Any) -> None:
    checks.within("cond_drop_prob", cfg.cond_drop_prob, 0, 1)
    if cfg.guidance_scale is None:
        raise ConfigError(
            "guidance_scale=null is invalid for ddpm-train: give the guidance the run draws its grids with "
            "and records as its checkpoints' default (1: none)"
        )
    if cfg.class_cond and cfg.cond_drop_prob == 0 and cfg.guidance_scale != 1:
        raise ConfigError(
            f"guidance_scale={cfg.guidance_scale} needs the unconditional model, which cond_drop_prob=0 "
            "never trains: set guidance_scale=1, or cond_drop_prob > 0"
        )


def validate_train(cfg: Any) -> None:
    check_data(cfg.data)
    check_schedule(cfg.schedule, cfg.timesteps)
    check_model(cfg.model, cfg.data.image_size)
    check_objective(cfg)
    check_conditioning(cfg)
    checks.at_least("batch_size", cfg.batch_size, 1)
    checks.at_least("grad_accum", cfg.grad_accum, 1)
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} is invalid: it must divide batch_size={cfg.batch_size} "
            "(batch_size is the number of images per optimizer step)"
        )
    checks.at_least("steps", cfg.steps, 1)
    checks.above("lr", cfg.lr, 0)
    checks.at_least("lr_warmup", cfg.lr_warmup, 0)
    checks.at_least("grad_clip", cfg.grad_clip, 0)
    checks.within("ema.decay", cfg.ema.decay, 0, 1, " (0: no EMA)")
    checks.at_least("ema.warmup", cfg.ema.warmup, 0)
    check_sampling(cfg)
    check_device(cfg.device)
    checks.above("dist_timeout", cfg.dist_timeout, 0)
    checks.at_least("check_every", cfg.check_every, 1)
    checks.at_least("log_every", cfg.log_every, 1)
    checks.at_least("sample_every", cfg.sample_every, 0)
    checks.at_least("checkpoint_every", cfg.checkpoint_every, 0)
    checks.at_least("sample_n", cfg.sample_n, 1)
    checks.at_least("sample_batch_size", cfg.sample_batch_size, 1)
    checks.at_least("eval_every", cfg.eval_every, 0)
    check_scoring(cfg.eval, "eval.")
    if cfg.eval.nll:
        resolve_split(Split(cfg.eval.nll_split), cfg.data, key="eval.nll_split")
    check_sampling(cfg.eval, "eval.")
    checks.at_least("forward_n", cfg.forward_n, 0)
    checks.at_least("keep_last", cfg.keep_last, 0)
    checks.at_least("max_nonfinite", cfg.max_nonfinite, 1)
    check_logger(cfg.logger)


def check_data_fits(cfg: Any, dataset: Dataset, saved: dict[str, Any] | None) -> None:
    if len(dataset) < cfg.batch_size:
        skipped = len(getattr(dataset, "skipped", []))
        unreadable = f", besides {skipped} unreadable files" if skipped else ""
        raise ConfigError(
            f"batch_size={cfg.batch_size} is larger than the data set ({len(dataset)} images{unreadable}): "
            "every step needs a full batch"
        )
    if saved is not None and saved["state"]["data"]["n_images"] != len(dataset):
        raise ConfigError(
            f"data.root={cfg.data.get('root', cfg.data.name)} now holds {len(dataset)} images, but the "
            f"resumed run was trained on {saved['state']['data']['n_images']}: its data order cannot go on"
        )
    mb, limit = resident_mb(cfg.data, len(dataset)), cfg.data.on_device_max_mb
    if cfg.data.on_device is True and mb > limit:
        raise ConfigError(
            f"data.on_device=true is refused: the data set ({len(dataset):,} images) would take "
            f"{mb:,.1f} MiB on the device, over data.on_device_max_mb={limit:g}; raise the limit, or read "
            "it with a DataLoader (data.on_device=false)"
        )


def check_classes_kept(cfg: Any, class_names: tuple[str, ...] | None, saved: dict[str, Any] | None) -> None:
    """A resumed conditional run's labels must mean what they meant: the same class names in order."""
    if saved is None or class_names is None:
        return
    before = tuple(saved.get("class_names") or ())
    if before != class_names:
        gone = [c for c in before if c not in class_names]
        new = [c for c in class_names if c not in before]
        what = (
            f"lacks {gone}"
            if gone and not new
            else f"adds {new}"
            if new and not gone
            else f"has {list(class_names)}"
        )
        raise ConfigError(
            f"data.root={cfg.data.get('root', cfg.data.name)} now {what}, but the resumed run was trained on "
            f"the classes {list(before)}: its labels would change meaning"
        )


def check_ranks_fit(cfg: Any, runtime: Runtime) -> None:
    per_step = runtime.world_size * cfg.grad_accum
    if runtime.distributed and cfg.batch_size % per_step:
        raise ConfigError(
            f"batch_size={cfg.batch_size} is invalid for {runtime.world_size} ranks and "
            f"grad_accum={cfg.grad_accum}: each rank takes batch_size / {runtime.world_size} images a step "
            f"in grad_accum micro-batches, so batch_size must be a multiple of {per_step}"
        )


def validate_sample(cfg: Any) -> None:
    """Checks that need no checkpoint (sample_steps needs no T: it is at most T)."""
    check_sampling(cfg)
    if cfg.n is not None:
        checks.at_least("n", cfg.n, 1)
    checks.at_least("batch_size", cfg.batch_size, 1)
    checks.at_least("gif_frames", cfg.gif_frames, 2)  # x_T and the images at least
    checks.at_least("gif_frame_ms", cfg.gif_frame_ms, 10)  # a GIF counts in hundredths of a second
    check_device(cfg.device)


def check_scoring(cfg: Any, prefix: str = "") -> None:
    """The keys of scoring/default.yaml and the number of images scored (ddpm-eval's, or ddpm-train's
    eval.* with prefix "eval.")."""
    if any(f not in FEATURES for f in cfg.features):
        raise ConfigError(
            f"{prefix}features={list(cfg.features)} is invalid: choose from {', '.join(FEATURES)}"
        )
    if not cfg.features and not cfg.nll:
        raise ConfigError(
            f"{prefix}features=[] scores nothing: choose from {', '.join(FEATURES)}, or give "
            f"{prefix}nll=true for the likelihood alone"
        )
    checks.at_least(prefix + "nll_n", cfg.nll_n, 1)
    for key in ("n", "n_real", "kid_subsets"):
        checks.at_least(prefix + key, cfg[key], 2)
    for key in ("classifier_steps", "classifier_images", "kid_subset_size", "knn_k"):
        checks.at_least(prefix + key, cfg[key], 1)
    weights, cache = cfg.inception_weights, cfg.classifier_cache
    if weights is not None and not Path(weights).expanduser().is_file():
        raise ConfigError(
            f"{prefix}inception_weights={weights} does not exist; it is pytorch-fid's "
            "pt_inception-2015-12-05-6726825d.pth"
        )
    if cache is not None and Path(cache).expanduser().exists() and not Path(cache).expanduser().is_dir():
        raise ConfigError(
            f"{prefix}classifier_cache={cache} is a file: it must be a folder (made if missing)"
        )


def validate_eval(cfg: Any) -> None:
    if (cfg.ckpt is None) == (cfg.samples is None):
        raise ConfigError("give exactly one of ckpt=PATH (score its samples) or samples=DIR (score a folder)")
    if cfg.samples is not None and cfg.data is None:
        raise ConfigError(f"samples=DIR needs data=... ({', '.join(DATASETS.names)}) for the real images")
    if cfg.samples is not None and cfg.nll:
        raise ConfigError(
            f"nll=true needs ckpt=PATH: the likelihood is a model's, and samples={cfg.samples} has none"
        )
    check_scoring(cfg)
    checks.at_least("batch_size", cfg.batch_size, 1)
    check_sampling(cfg)
    check_device(cfg.device)
