"""The schemas of the four commands' configs, and their registration with Hydra.

The values live in the YAML files under ``configs/``; the dataclasses here only give each key its type,
so Hydra rejects a misspelt key or a wrong type when it merges the overrides. Each config group option's
own schema lives beside the code that builds it and is found through that group's registry. What types
cannot express (ranges, divisibility) is checked by validate.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ddpm import keys
from ddpm.data import DATASETS, Split
from ddpm.data.sets import DataConfig
from ddpm.diffusion.gaussian import Loss, Objective, Variance
from ddpm.diffusion.sampling import Spacing
from ddpm.diffusion.schedules import SCHEDULES, ScheduleConfig
from ddpm.errors import ConfigError
from ddpm.export import ExportFormat
from ddpm.keys import resumable
from ddpm.models import MODELS, ModelConfig
from ddpm.runtime import Precision
from ddpm.training.rundir.logger import Logger
from ddpm.training.step import LRDecay
from ddpm.training.stopping import OnNonFinite


@dataclass
class SamplingKeys:
    """How images are drawn, for the grids during training, ddpm-sample and ddpm-eval (a resumed run may
    draw its grids otherwise)."""

    sampler: str = resumable()  # one of diffusion.sampling.SAMPLERS
    sample_steps: int | None = resumable()  # at most T (more: all T); None: every one of the T steps
    timestep_spacing: Spacing = resumable()
    eta: float = resumable()  # ddim only
    ddpm_variance: Variance = resumable()  # ddpm only
    clip_x0: bool | None = resumable(None)  # None: the model's own (true for a ddpm-train run)
    # class-conditional models: 1 the conditional model, 0 the unconditional one, > 1 guided; None: the
    # checkpoint's own (ddpm-train's guidance_scale)
    guidance_scale: float | None = resumable()


@dataclass
class ScoringKeys:
    """How generated images are scored against real ones, for ddpm-eval and ddpm-train's eval.*."""

    n_real: int = MISSING
    features: list[str] = MISSING  # of evaluation.features.FEATURES
    inception_weights: str | None = MISSING
    classifier_steps: int = MISSING
    classifier_images: int = MISSING
    classifier_cache: str | None = MISSING
    kid_subsets: int = MISSING
    kid_subset_size: int = MISSING
    knn_k: int = MISSING
    # the likelihood bound in bits/dim (evaluation/nll.py), on nll_n real images of nll_split
    nll: bool = MISSING
    nll_split: Split = MISSING
    nll_n: int = MISSING


@dataclass
class RunEvalConfig(SamplingKeys, ScoringKeys):
    """What a training run scores itself with (eval_at_end, eval_every)."""

    n: int = MISSING
    seed: int = MISSING


@dataclass
class EMAConfig:
    decay: float = MISSING  # 0: no EMA
    warmup: float = MISSING  # decay_t = min(decay, (1 + t) / (warmup + t)); 0: none


@dataclass
class TrainConfig(SamplingKeys):
    # resumable(): a resumed run may change it; named=False: a sweep's folder names leave it out (keys.py)
    schedule: ScheduleConfig = MISSING
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    ema: EMAConfig = MISSING
    eval: RunEvalConfig = resumable(named=False)
    loss: Loss = MISSING
    objective: Objective = MISSING
    learn_sigma: bool = MISSING
    vlb_weight: float = MISSING
    class_cond: bool = MISSING
    cond_drop_prob: float = MISSING
    min_snr_gamma: float = MISSING
    offset_noise: float = MISSING
    timesteps: int = MISSING
    batch_size: int = MISSING
    grad_accum: int = MISSING
    steps: int = resumable(named=False)
    lr: float = MISSING
    lr_warmup: int = MISSING
    lr_decay: LRDecay = MISSING
    grad_clip: float = MISSING
    seed: int = MISSING
    device: str = resumable(named=False)
    precision: Precision = resumable()
    compile: bool | None = resumable(None)  # None: on a CUDA GPU
    cuda_graph: bool | None = resumable(None)  # None: on one CUDA GPU
    dist_timeout: float = resumable(named=False)
    check_every: int = resumable(named=False)
    log_every: int = resumable(named=False)
    sample_every: int = resumable(named=False)
    checkpoint_every: int = resumable(named=False)
    sample_n: int = resumable(named=False)
    sample_batch_size: int = resumable(named=False)
    eval_at_end: bool | None = resumable(None, named=False)  # None: on in multirun jobs
    eval_every: int = resumable(named=False)
    forward_n: int = resumable(named=False)
    keep_last: int = resumable(named=False)
    on_nonfinite: OnNonFinite = resumable(named=False)
    max_nonfinite: int = resumable(named=False)
    logger: Logger = resumable(named=False)
    resume: str | None = resumable(None, named=False)  # null | auto | PATH
    init: str | None = None  # fine-tune: the checkpoint, export or diffusers folder the weights start from


@dataclass
class SampleConfig(SamplingKeys):
    ckpt: str = MISSING
    ema: bool = MISSING
    labels: Any = None  # a class index or name, or a list of them (Any: Hydra gives ints and strings)
    n: int | None = None  # None: 64, or 8 of each class drawn (conditioning.SAMPLE_N, SAMPLE_PER_CLASS)
    seed: int = MISSING
    out: str | None = None
    batch_size: int = MISSING
    device: str = MISSING
    save_images: bool = MISSING
    gif: bool = MISSING
    gif_frames: int = MISSING
    gif_frame_ms: int = MISSING


@dataclass
class ExportConfig:
    ckpt: str = MISSING
    format: ExportFormat = MISSING
    out: str | None = None
    ema: bool = MISSING


@dataclass
class EvalConfig(SamplingKeys, ScoringKeys):
    ckpt: str | None = MISSING
    samples: str | None = MISSING
    data: DataConfig | None = None
    n: int = MISSING
    seed: int = MISSING
    batch_size: int = MISSING
    device: str = MISSING
    ema: bool = MISSING
    out: str | None = MISSING


COMMANDS = {"train": TrainConfig, "sample": SampleConfig, "eval": EvalConfig, "export": ExportConfig}
GROUPS = {"schedule": SCHEDULES, "model": MODELS, "data": DATASETS}


def train_keys() -> list[tuple[str, bool, bool]]:
    """(key, resumable, named) for every ddpm-train key, from the schemas' marks (keys.py)."""
    return list(keys.leaves(TrainConfig, _group_schemas()))


def resumable_train_keys() -> tuple[str, ...]:
    """The keys a resumed run may change."""
    return keys.resumable_keys(TrainConfig, _group_schemas())


def unnamed_train_keys() -> list[str]:
    """The keys a sweep's folder names leave out (train.yaml's exclude_keys)."""
    return list(keys.unnamed_keys(TrainConfig, _group_schemas()))


def folder_name(overrides: str) -> str:
    """A sweep job's folder name from its overrides (train.yaml's sweep.subdir): a value that holds a
    path (data.root=/data/cats, init=runs/a/last.pt) would otherwise nest the folder at its slashes."""
    return overrides.replace("/", "_")


def _group_schemas() -> dict[str, list[type]]:
    return {group: [option.schema for option in registry] for group, registry in GROUPS.items()}


def register_configs() -> None:
    """Store the schemas where the YAML files' defaults lists find them: schema/<command> and
    schema/<group>/<option> (configs/model/unet.yaml extends schema/model/unet, and so may a user's);
    register the resolvers that give train.yaml its sweep folder names and the keys they leave out."""
    OmegaConf.register_new_resolver("ddpm.unnamed_keys", unnamed_train_keys, replace=True)
    OmegaConf.register_new_resolver("ddpm.folder_name", folder_name, replace=True)
    cs = ConfigStore.instance()
    for name, node in COMMANDS.items():
        cs.store(group="schema", name=name, node=node)
    for group, registry in GROUPS.items():
        for option in registry:
            cs.store(group=f"schema/{group}", name=option.stored_as, node=option.schema)


def train_config(overrides: Sequence[str] = ()) -> DictConfig:
    """The checked config ``ddpm-train`` would compose from these overrides, for your own code: the
    schedule, model and data builders take its groups (``build_schedule(cfg.schedule, cfg.timesteps)``)."""
    from hydra import compose, initialize_config_module

    from ddpm.validate import validate_train

    register_configs()
    with initialize_config_module(config_module="ddpm.configs", version_base="1.3"):
        cfg = compose(config_name="train", overrides=list(overrides))
    validate_train(cfg)
    return cfg


def typed_train_config(plain: dict[str, Any]) -> DictConfig:
    """A training config saved as plain values (a checkpoint's) as the typed config ddpm-train composes:
    enums as enums, and each group under the schema of the option it records."""
    base = OmegaConf.structured(TrainConfig)
    try:
        for group, registry in GROUPS.items():
            name = plain[group]["name"]
            if name not in registry:
                raise ConfigError(f"the saved config names an unknown {group} {name!r}")
            base[group] = OmegaConf.structured(registry[name].schema)
        return OmegaConf.merge(base, plain)
    except KeyError as e:
        raise ConfigError(f"the saved config has no {e}") from e
    except OmegaConfBaseException as e:
        reason = str(e).splitlines()[0]
        raise ConfigError(f"the saved config does not fit this ddpm's schema: {reason}") from e
