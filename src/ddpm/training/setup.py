"""A run's parts, planned, checked and built before the first file is written: ``setup(cfg, run_dir)``
gives the ``Run`` the loop trains."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from ddpm.data import build_dataset
from ddpm.data.order import DataOrder
from ddpm.data.resident import data_path
from ddpm.diffusion.gaussian import Diffusion
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.models import build_model
from ddpm.runtime import Runtime, seed_everything
from ddpm.trained import TrainedModel, image_shape
from ddpm.training.ema import EMA
from ddpm.training.fastpath import checked_train_step
from ddpm.training.finetune import check_classes, load_init_weights
from ddpm.training.rundir.plan import RunPlan, plain_config, plan_run
from ddpm.training.rundir.state import restore
from ddpm.training.scores import RunScorer
from ddpm.training.step import StepOptions, TrainStep, build_optimizer, lr_to_device
from ddpm.validate import check_classes_kept, check_data_fits, check_ranks_fit, validate_train


@dataclass
class Run:
    """What a run needs, built by ``setup``; ``start`` is the number of steps already taken."""

    cfg: DictConfig
    plan: RunPlan
    runtime: Runtime
    dataset: Dataset
    order: DataOrder
    diffusion: Diffusion
    model: nn.Module
    ema: EMA | None
    train_step: TrainStep  # one optimizer step, with its draws, lr, EMA update
    start: int = 0
    elapsed_before: float = 0.0  # training time of the steps taken before a resume
    scorer: RunScorer | None = None  # on the main rank of a run that scores itself
    eval_note: str | None = None  # how the data set changed the run's scoring, for its header
    class_names: tuple[str, ...] | None = None  # a class-conditional run's classes
    path_notes: list[str] = dataclasses.field(default_factory=list)  # fast paths that failed their check

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.train_step.optimizer

    def sampling_model(self, step: int) -> TrainedModel:
        return sampling_model(self.cfg, self.diffusion, self.model, self.ema, step, self.class_names)

    def describe(self) -> str:
        cfg, d = self.cfg, self.cfg.data
        n_params = sum(p.numel() for p in self.model.parameters())
        source = data_path(d, len(self.dataset), self.runtime.device)
        return (
            f"ddpm-train | data {d.name} {d.image_size}x{d.image_size}x{d.channels} ({len(self.dataset):,} "
            f"images, {source}) | U-Net {n_params / 1e6:.2f}M params | "
            f"{cfg.schedule.name} schedule, T={cfg.timesteps} | "
            f"{cfg.objective.name}-prediction, {cfg.loss.name} loss{self.variance()} | {self.conditioning()}"
            f"batch {cfg.batch_size} | "
            f"{cfg.steps} steps | EMA {cfg.ema.decay or 'off'} | sampler {cfg.sampler}, "
            f"{SamplingOptions.from_config(cfg).steps(cfg.timesteps)} steps | "
            f"{self.runtime.describe()} | run dir {self.plan.run_dir}"
        )

    def variance(self) -> str:
        if not self.cfg.learn_sigma:
            return ""
        return f", learned variances (hybrid loss, vlb_weight {self.cfg.vlb_weight:g})"

    def conditioning(self) -> str:
        if self.class_names is None:
            return ""
        cfg = self.cfg
        return (
            f"class-conditional on {len(self.class_names)} classes, labels dropped with p="
            f"{cfg.cond_drop_prob:g}, grids at guidance {cfg.guidance_scale:g} | "
        )


def sampling_model(
    cfg: DictConfig,
    diffusion: Diffusion,
    model: nn.Module,
    ema: EMA | None,
    step: int,
    class_names: tuple[str, ...] | None = None,
) -> TrainedModel:
    """What a run's grids and scores draw from at ``step``: the EMA weights where it keeps an EMA."""
    network, weights = (ema.model, "ema") if ema is not None else (model, "model")
    data = plain_config(cfg)["data"]
    guidance, null_trained = (cfg.guidance_scale, cfg.cond_drop_prob > 0) if class_names else (1.0, False)
    return TrainedModel(
        network, diffusion, image_shape(data), class_names, data, step, weights, guidance, null_trained
    )


def setup(cfg: DictConfig, run_dir: Path, overrides: Sequence[str] = (), sweep_job: int | None = None) -> Run:
    """Plan, check and build the run; nothing is written yet. Under torchrun, every rank builds the same
    objects from the same checkpoint (read to the CPU) and joins the others before anything is written.
    ``sweep_job`` is the job's number in a sweep: it chooses the GPU where several jobs share a machine,
    and eval_at_end=null scores a sweep's jobs."""
    plan = plan_run(cfg, run_dir, overrides)
    cfg = plan.config
    validate_train(cfg)
    runtime = Runtime.for_training(cfg, sweep_job)
    check_ranks_fit(cfg, runtime)
    dataset = build_dataset(cfg.data, labels=cfg.class_cond)
    check_data_fits(cfg, dataset, plan.saved)
    class_names = tuple(dataset.classes) if cfg.class_cond else None
    check_classes_kept(cfg, class_names, plan.saved)
    if plan.init is not None:
        check_classes(plan.init, class_names)
    # the main rank alone scores, with no collective inside; built now, so a bad setting fails first
    scorer, eval_note = (
        RunScorer.for_run(cfg, dataset, runtime.device, sweep_job is not None)
        if runtime.is_main
        else (None, None)
    )
    runtime.start(cfg.dist_timeout)

    seed_everything(cfg.seed)
    diffusion = Diffusion.from_config(cfg).to(runtime.device)
    num_classes = len(class_names) if class_names is not None else None
    model = build_model(cfg.model, cfg.data.channels, cfg.data.image_size, num_classes, cfg.learn_sigma)
    if plan.init is not None:  # before the EMA's copy: it starts from the same weights
        load_init_weights(model, plan.init)
    model = model.to(runtime.device)
    optimizer = build_optimizer(model, cfg.lr, runtime.device, capturable=runtime.cuda_graph)
    ema = EMA(model, cfg.ema.decay, cfg.ema.warmup) if cfg.ema.decay > 0 else None
    order = DataOrder(len(dataset), cfg.batch_size, cfg.seed, cfg.data.hflip)
    start, elapsed_before = 0, 0.0
    if plan.saved is not None:
        ema_model = ema.model if ema is not None else None
        start, elapsed_before = restore(plan.saved, model, ema_model, optimizer)
        lr_to_device(optimizer, runtime.device, capturable=runtime.cuda_graph)
    # wrapped after the EMA copy and the restore: the EMA averages the plain module's weights; a fast path
    # is checked against the eager step first, and falls back where it fails (fastpath.py)
    opts = StepOptions.from_config(cfg, num_classes)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)
    asked = (cfg.compile is True, cfg.cuda_graph is True)
    train_step, runtime, path_notes = checked_train_step(
        model, optimizer, diffusion, ema, opts, runtime, shape, asked
    )
    return Run(
        cfg,
        plan,
        runtime,
        dataset,
        order,
        diffusion,
        model,
        ema,
        train_step,
        start,
        elapsed_before,
        scorer,
        eval_note,
        class_names,
        path_notes,
    )
