"""Config schemas and the checks that run before any work.

The values live in the YAML files under ``configs/``; the dataclasses here only give each key its type,
so Hydra rejects a misspelt key or a wrong type when it merges the overrides. ``validate_train`` then
checks what types cannot express (ranges, divisibility), so a bad run stops before it writes anything.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException


class ConfigError(ValueError):
    """A bad value in the user's config; its message is one line naming the value and the valid choices."""


class Loss(Enum):
    l1 = "l1"
    l2 = "l2"
    huber = "huber"


class Objective(Enum):
    """What the network predicts: the noise (Ho et al.), the clean image, or v (Salimans & Ho 2022)."""

    eps = "eps"
    x0 = "x0"
    v = "v"


class Spacing(Enum):
    linspace = "linspace"
    leading = "leading"
    trailing = "trailing"


class Variance(Enum):
    small = "small"  # beta~_t, the posterior variance
    large = "large"  # beta_t


class BadImages(Enum):
    """What a folder data set does with files that fail to decode (truncated, corrupt, not an image)."""

    skip = "skip"
    error = "error"


class OnNonFinite(Enum):
    """What training does when a step's loss or gradient is NaN or infinite."""

    stop = "stop"
    skip = "skip"


class LRDecay(Enum):
    none = "none"
    cosine = "cosine"


SAMPLERS = ("ddpm", "ddim", "dpm_solver++")


# ---------------------------------------------------------------------------------------------- schedules
@dataclass
class ScheduleConfig:
    name: str = MISSING
    zero_terminal_snr: bool = MISSING  # rescale so abar_T = 0 exactly (Lin et al. 2024, Algorithm 1)


@dataclass
class LinearSchedule(ScheduleConfig):
    beta_start: float = MISSING
    beta_end: float = MISSING


@dataclass
class QuadraticSchedule(ScheduleConfig):
    beta_start: float = MISSING
    beta_end: float = MISSING


@dataclass
class SigmoidSchedule(ScheduleConfig):
    beta_start: float = MISSING
    beta_end: float = MISSING
    start: float = MISSING  # the sigmoid is evaluated on linspace(start, end, T)
    end: float = MISSING


@dataclass
class CosineSchedule(ScheduleConfig):
    s: float = MISSING  # offset that keeps beta_1 from being vanishingly small (Nichol & Dhariwal)
    max_beta: float = MISSING  # clip near t = T, where the cosine formula sends beta to 1


# ----------------------------------------------------------------------------------------------- model
@dataclass
class ModelConfig:
    name: str = MISSING
    dim: int = MISSING
    dim_mults: list[int] = MISSING
    dropout: float = MISSING


@dataclass
class HoUNetConfig(ModelConfig):
    num_res_blocks: int = MISSING
    attn_resolutions: list[int] = MISSING


@dataclass
class UNetConfig(ModelConfig):
    resnet_block_groups: int = MISSING
    attn_heads: int = MISSING
    attn_dim_head: int = MISSING


# ------------------------------------------------------------------------------------------------ data
@dataclass
class DataConfig:
    name: str = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    hflip: bool = MISSING
    num_workers: int = MISSING


@dataclass
class FolderData(DataConfig):
    root: str = MISSING
    bad_images: BadImages = MISSING
    background: int = MISSING  # grey level that transparent pixels are composited onto


@dataclass
class TorchvisionData(DataConfig):
    root: str = MISSING
    download: bool = MISSING


# -------------------------------------------------------------------------------------------- sampling
@dataclass
class SamplingKeys:
    """How images are drawn, for the grids during training and for ddpm-sample."""

    sampler: str = MISSING  # one of SAMPLERS
    sample_steps: int | None = MISSING  # None: every one of the T steps
    timestep_spacing: Spacing = MISSING
    eta: float = MISSING  # ddim only
    ddpm_variance: Variance = MISSING  # ddpm only
    clip_x0: bool = MISSING


@dataclass
class EMAConfig:
    decay: float = MISSING  # 0: no EMA
    warmup: float = MISSING  # decay_t = min(decay, (1 + t) / (warmup + t)); 0: none


# ----------------------------------------------------------------------------------------------- train
@dataclass
class TrainConfig(SamplingKeys):
    schedule: ScheduleConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    ema: EMAConfig = MISSING
    loss: Loss = MISSING
    objective: Objective = MISSING
    min_snr_gamma: float = MISSING
    offset_noise: float = MISSING
    timesteps: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    steps: int = MISSING
    lr: float = MISSING
    lr_warmup: int = MISSING
    lr_decay: LRDecay = MISSING
    grad_clip: float = MISSING
    seed: int = MISSING
    device: str = MISSING
    log_every: int = MISSING
    sample_every: int = MISSING
    checkpoint_every: int = MISSING
    sample_n: int = MISSING
    forward_n: int = MISSING
    keep_last: int = MISSING
    on_nonfinite: OnNonFinite = MISSING
    max_nonfinite: int = MISSING
    resume: str | None = None  # null | auto | PATH


@dataclass
class SampleConfig(SamplingKeys):
    ckpt: str = MISSING
    ema: bool = MISSING
    n: int = MISSING
    seed: int = MISSING
    out: str | None = None
    batch_size: int = MISSING
    device: str = MISSING
    save_images: bool = MISSING


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    out: str | None = None
    ema: bool = MISSING


@dataclass
class EvalConfig(SamplingKeys):
    ckpt: str | None = MISSING
    samples: str | None = MISSING
    data: DataConfig | None = None
    n: int = MISSING
    n_real: int = MISSING
    features: list[str] = MISSING
    inception_weights: str | None = MISSING
    classifier_steps: int = MISSING
    classifier_images: int = MISSING
    classifier_cache: str | None = MISSING
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    knn_k: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    device: str = MISSING
    ema: bool = MISSING
    out: str | None = MISSING


SCHEDULE_SCHEMAS: dict[str, type[ScheduleConfig]] = {
    "linear": LinearSchedule,
    "quadratic": QuadraticSchedule,
    "sigmoid": SigmoidSchedule,
    "cosine": CosineSchedule,
}


MODEL_SCHEMAS: dict[str, type[ModelConfig]] = {"unet": UNetConfig, "ho2020": HoUNetConfig}
DATA_SCHEMAS: dict[str, type[DataConfig]] = {
    "digits": DataConfig,
    "folder": FolderData,
    "mnist": TorchvisionData,
    "fashion_mnist": TorchvisionData,
    "cifar10": TorchvisionData,
}


def typed_train_config(plain: dict[str, Any]) -> DictConfig:
    """A training config saved as plain values (a checkpoint's) as the typed config ddpm-train composes:
    enums as enums, and each group under the schema of the choice it records."""
    base = OmegaConf.structured(TrainConfig)
    try:
        base.schedule = OmegaConf.structured(SCHEDULE_SCHEMAS[plain["schedule"]["name"]])
        base.model = OmegaConf.structured(MODEL_SCHEMAS[plain["model"]["name"]])
        base.data = OmegaConf.structured(DATA_SCHEMAS[plain["data"]["name"]])
        return OmegaConf.merge(base, plain)
    except KeyError as e:
        raise ConfigError(f"the saved config names an unknown choice {e}") from e
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"the saved config does not fit this ddpm's schema: {reason}") from e


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them (group ``schema``)."""
    cs = ConfigStore.instance()
    cs.store(group="schema", name="train", node=TrainConfig)
    cs.store(group="schema", name="sample", node=SampleConfig)
    cs.store(group="schema", name="eval", node=EvalConfig)
    cs.store(group="schema", name="export", node=ExportConfig)
    for name, node in SCHEDULE_SCHEMAS.items():
        cs.store(group="schema/schedule", name=name, node=node)
    cs.store(group="schema/model", name="unet", node=UNetConfig)
    cs.store(group="schema/model", name="ho2020", node=HoUNetConfig)
    cs.store(group="schema/data", name="digits", node=DataConfig)
    cs.store(group="schema/data", name="folder", node=FolderData)
    cs.store(group="schema/data", name="torchvision", node=TorchvisionData)


# ------------------------------------------------------------------------------------------- validation
def _finite(name: str, value: int | float) -> None:
    if not math.isfinite(value):
        raise ConfigError(f"{name}={value} is invalid: it must be a finite number")


def _at_least(name: str, value: int | float, low: int | float) -> None:
    _finite(name, value)
    if not value >= low:
        raise ConfigError(f"{name}={value} is invalid: it must be >= {low}")


def validate_device(device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(f"device={device!r} is invalid: choose one of auto, cpu, cuda, cuda:N")


def validate_schedule(schedule: Any, timesteps: int) -> None:
    _at_least("timesteps", timesteps, 1)
    if schedule.name not in SCHEDULE_SCHEMAS:
        choices = ", ".join(SCHEDULE_SCHEMAS)
        raise ConfigError(f"schedule.name={schedule.name!r} is invalid: choose one of {choices}")
    if schedule.name == "cosine":
        if not 0 < schedule.max_beta < 1:
            raise ConfigError(f"schedule.max_beta={schedule.max_beta} is invalid: it must lie in (0, 1)")
        _at_least("schedule.s", schedule.s, 0)
    elif not 0 < schedule.beta_start <= schedule.beta_end < 1:
        raise ConfigError(
            f"schedule.beta_start={schedule.beta_start}, schedule.beta_end={schedule.beta_end} are invalid: "
            "they need 0 < beta_start <= beta_end < 1"
        )
    if schedule.name == "sigmoid":
        _finite("schedule.start", schedule.start)
        _finite("schedule.end", schedule.end)
    if schedule.name == "sigmoid" and not schedule.start < schedule.end:
        raise ConfigError(f"schedule.start={schedule.start} must be below schedule.end={schedule.end}")


MODELS = ("unet", "ho2020")


def validate_model(model: Any, image_size: int) -> None:
    if model.name not in MODELS:
        raise ConfigError(f"model.name={model.name!r} is invalid: choose one of {', '.join(MODELS)}")
    if model.dim < 4 or model.dim % 2:
        raise ConfigError(f"model.dim={model.dim} is invalid: it must be even and >= 4 (the time embedding)")
    if len(model.dim_mults) == 0 or min(model.dim_mults) < 1:
        mults = list(model.dim_mults)
        raise ConfigError(f"model.dim_mults={mults} is invalid: give one or more integers >= 1")
    if not 0 <= model.dropout < 1:
        raise ConfigError(f"model.dropout={model.dropout} is invalid: it must lie in [0, 1)")
    factor = 2 ** (len(model.dim_mults) - 1)
    if image_size % factor:
        raise ConfigError(
            f"data.image_size={image_size} is invalid for model.dim_mults={list(model.dim_mults)}: "
            f"the U-Net halves it {len(model.dim_mults) - 1} times, so it must be a multiple of {factor}"
        )
    widths = sorted({model.dim, *(model.dim * m for m in model.dim_mults)})
    if model.name == "unet":
        _at_least("model.attn_heads", model.attn_heads, 1)
        _at_least("model.attn_dim_head", model.attn_dim_head, 1)
        groups = model.resnet_block_groups
        _at_least("model.resnet_block_groups", groups, 1)
        if any(w % groups for w in widths):
            raise ConfigError(
                f"model.resnet_block_groups={groups} is invalid: it must divide every block width {widths}"
            )
    else:
        _at_least("model.num_res_blocks", model.num_res_blocks, 1)
        if any(w % 32 for w in widths):
            raise ConfigError(
                f"model.dim={model.dim} is invalid for model=ho2020: its GroupNorm has 32 groups, so every "
                f"width {widths} must be a multiple of 32"
            )
        resolutions = [image_size // 2**i for i in range(len(model.dim_mults))]
        stray = [r for r in model.attn_resolutions if r not in resolutions]
        if stray:
            raise ConfigError(
                f"model.attn_resolutions={list(model.attn_resolutions)} is invalid: {stray} is not a "
                f"resolution of this U-Net ({', '.join(map(str, resolutions))})"
            )


def validate_data(data: Any) -> None:
    _at_least("data.image_size", data.image_size, 1)
    if data.channels not in (1, 3):
        raise ConfigError(f"data.channels={data.channels} is invalid: choose one of 1, 3")
    _at_least("data.num_workers", data.num_workers, 0)
    if data.name == "folder" and not 0 <= data.background <= 255:
        raise ConfigError(f"data.background={data.background} is invalid: it must lie in [0, 255]")


def validate_sampling(cfg: Any, timesteps: int | None) -> None:
    """The sampler keys, against the number of training timesteps T where it is known."""
    if cfg.sampler not in SAMPLERS:
        raise ConfigError(f"sampler={cfg.sampler!r} is invalid: choose one of {', '.join(SAMPLERS)}")
    _at_least("sample_steps", cfg.sample_steps or 1, 1)
    if timesteps is not None and cfg.sample_steps is not None and not 1 <= cfg.sample_steps <= timesteps:
        raise ConfigError(
            f"sample_steps={cfg.sample_steps} is invalid: it must lie in [1, T={timesteps}] (null: all T)"
        )
    _at_least("eta", cfg.eta, 0)


def validate_objective(cfg: Any) -> None:
    _at_least("min_snr_gamma", cfg.min_snr_gamma, 0)
    _at_least("offset_noise", cfg.offset_noise, 0)
    if cfg.schedule.zero_terminal_snr and cfg.objective is Objective.eps:
        # At abar_T = 0, x_T carries no image: x_0 = (x_T - sqrt(1 - abar_T) eps) / sqrt(abar_T) is 0 / 0.
        raise ConfigError(
            "objective=eps is invalid with schedule.zero_terminal_snr=true: "
            "eps-prediction cannot recover x_0 at abar_T = 0; choose objective=v or objective=x0"
        )


def validate_train(cfg: Any) -> None:
    """Every semantic check on a training config; raises ConfigError on the first bad value."""
    validate_data(cfg.data)
    validate_schedule(cfg.schedule, cfg.timesteps)
    validate_model(cfg.model, cfg.data.image_size)
    validate_objective(cfg)
    _at_least("batch_size", cfg.batch_size, 1)
    _at_least("grad_accum", cfg.grad_accum, 1)
    if cfg.batch_size % cfg.grad_accum:
        raise ConfigError(
            f"grad_accum={cfg.grad_accum} is invalid: it must divide batch_size={cfg.batch_size} "
            "(batch_size is the number of images per optimizer step)"
        )
    _at_least("steps", cfg.steps, 1)
    _finite("lr", cfg.lr)
    if not cfg.lr > 0:
        raise ConfigError(f"lr={cfg.lr} is invalid: it must be > 0")
    _at_least("lr_warmup", cfg.lr_warmup, 0)
    _at_least("grad_clip", cfg.grad_clip, 0)
    if not 0 <= cfg.ema.decay < 1:
        raise ConfigError(f"ema.decay={cfg.ema.decay} is invalid: it must lie in [0, 1) (0: no EMA)")
    _at_least("ema.warmup", cfg.ema.warmup, 0)
    validate_sampling(cfg, cfg.timesteps)
    validate_device(cfg.device)
    _at_least("log_every", cfg.log_every, 1)
    _at_least("sample_every", cfg.sample_every, 0)
    _at_least("checkpoint_every", cfg.checkpoint_every, 0)
    _at_least("sample_n", cfg.sample_n, 1)
    _at_least("forward_n", cfg.forward_n, 0)
    _at_least("keep_last", cfg.keep_last, 0)
    _at_least("max_nonfinite", cfg.max_nonfinite, 1)


def validate_sample(cfg: Any) -> None:
    """Checks that need no checkpoint; sample_steps is checked against T once the checkpoint is read."""
    validate_sampling(cfg, None)
    _at_least("n", cfg.n, 1)
    _at_least("batch_size", cfg.batch_size, 1)
    validate_device(cfg.device)
