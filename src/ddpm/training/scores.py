"""A run that scores itself: FID / KID of a fixed set of samples against its data, through ddpm-eval's
``Scorer``, and with eval.nll the likelihood bound of fixed real images, every ``eval_every`` steps and at
the end (``eval_at_end``: on by default in multirun jobs, so that a sweep ends in an answer). The scores go
to ``<run>/eval/step_<N>/eval.json`` and to metrics.jsonl."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from ddpm.data import build_dataset
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.evaluation.evaluate import Scorer, classifier_for, real_data_config, write_report
from ddpm.evaluation.nll import BoundSet
from ddpm.progress import ProgressReporter
from ddpm.trained import TrainedModel
from ddpm.training.rundir.plan import shell_override
from ddpm.training.rundir.writer import RunWriter
from ddpm.training.stopping import TrainingStopped


def labelled(dataset: Dataset) -> bool:
    return getattr(dataset, "labels", None) is not None


def scores_at_end(cfg: DictConfig, multirun: bool) -> bool:
    """eval_at_end, with null read as "in multirun jobs"."""
    return multirun if cfg.eval_at_end is None else bool(cfg.eval_at_end)


def scores_at_all(cfg: DictConfig, multirun: bool) -> bool:
    """Whether the run scores itself: at its end, or every eval_every steps."""
    return scores_at_end(cfg, multirun) or cfg.eval_every > 0


def eval_features(cfg: DictConfig, dataset: Dataset) -> tuple[list[str], str | None]:
    """The feature spaces this run scores in, and a note when the data set changes them: the classifier
    needs labels, so a folder of images is scored in Inception features where eval.inception_weights is
    given (a run must not download at its end) and not at all otherwise."""
    features = list(cfg.eval.features)
    if labelled(dataset) or "classifier" not in features:
        return features, None
    rest = [f for f in features if f != "classifier"]
    if cfg.eval.inception_weights is not None and "inception" not in rest:
        rest.append("inception")
    name = cfg.data.name
    if rest:
        return rest, f"data={name} has no labels to train the classifier on: the run is scored in {rest}"
    return [], (
        f"warning: data={name} has no labels to train the classifier on, so the run is not scored; give "
        "eval.inception_weights=PATH (pytorch-fid's FID Inception weights) to score it in their features"
    )


@dataclass
class RunScorer:
    """The run's scorer, built before the first step (the classifier trained or read from its cache, the
    real images' features computed, the bound's images read) so that a bad setting fails before any work,
    not at the end. ``scorer`` None: the bound alone (eval.features=[]); ``bound`` None: no eval.nll."""

    scorer: Scorer | None
    every: int
    at_end: bool
    sampling: SamplingOptions
    n: int
    seed: int
    batch_size: int
    bound: BoundSet | None = None

    @classmethod
    def for_run(
        cls, cfg: DictConfig, dataset: Dataset, device: torch.device, multirun: bool
    ) -> tuple[RunScorer | None, str | None]:
        """The scorer, or None where the run does not score itself; and a note for the run's header."""
        if not scores_at_all(cfg, multirun):
            return None, None
        features, note = eval_features(cfg, dataset)
        if not features and not cfg.eval.nll:
            return None, note
        scorer = (
            Scorer(cfg.eval, real_data_config(cfg.data), device, features, labels=cfg.class_cond)
            if features
            else None
        )
        sampling = SamplingOptions.from_config(cfg.eval)
        sampling = dataclasses.replace(sampling, sample_steps=sampling.steps(cfg.timesteps))  # as drawn
        run_scorer = cls(
            scorer,
            every=cfg.eval_every,
            at_end=scores_at_end(cfg, multirun),
            sampling=sampling,
            n=cfg.eval.n,
            seed=cfg.eval.seed,
            batch_size=cfg.sample_batch_size,
            bound=BoundSet.read(
                cfg.eval, real_data_config(cfg.data), cfg.learn_sigma, cfg.class_cond, key="eval.nll_split"
            )
            if cfg.eval.nll
            else None,
        )
        return run_scorer, note

    def describe(self, folder: Path) -> str:
        when = [f"every {self.every} steps"] if self.every else []
        when += ["at the end"] if self.at_end else []
        what = []
        if self.scorer is not None:
            drawn = f"{self.sampling.sampler}, {self.sampling.sample_steps} steps"
            what.append(
                f"FID / KID in {list(self.scorer.spaces)} features of {self.n} samples ({drawn}) against "
                f"{self.scorer.n_real} real images"
            )
        if self.bound is not None:
            b = self.bound
            what.append(f"the bound in bits/dim on {b.images.shape[0]} {b.split} images ({b.variance.name})")
        return f"eval: {' and '.join(what)}, {' and '.join(when)} -> {folder}"

    def due(self, step: int, last: bool, stopping: bool) -> bool:
        """At every eval_every steps and, with eval_at_end, at the last step; not when stopped early."""
        if stopping and not last:
            return False
        return bool(self.every and step % self.every == 0) or (last and self.at_end)

    def score(self, trained: TrainedModel, step: int, out: Path) -> dict[str, Any]:
        """Draw the fixed set of samples (the same x_T every time), score them, and bound the likelihood
        of the fixed real images; write eval.json (and samples.png) into ``out``; return the metrics row:
        fid_<space> and kid_<space>, and bpd, at this step."""
        began = time.perf_counter()
        source = {
            "step": step,
            "weights": trained.weights,
            "sampler": self.sampling.sampler,
            "sample_steps": self.sampling.steps(trained.diffusion.timesteps),
            "seed": self.seed,
        }
        report: dict[str, Any] = {"source": source}
        fake = None
        if self.scorer is not None:
            labels = self.scorer.draw_labels(self.n, self.seed) if trained.conditional else None
            fake = generate(trained, self.sampling, self.n, self.seed, self.batch_size, labels)
            if trained.conditional:
                source["guidance_scale"] = trained.guidance(self.sampling.guidance_scale)
            report, warnings = self.scorer.report(fake, source, labels)
            report["warnings"] = warnings
        if self.bound is not None:
            report["nll"] = self.bound.report(trained, self.batch_size, self.seed)
        write_report(report, fake, out)
        row: dict[str, Any] = {"step": step}
        for name, result in report.get("features", {}).items():
            row[f"fid_{name}"], row[f"kid_{name}"] = result["fid"], result["kid"]
            if "fid_floor" in result:
                row[f"fid_floor_{name}"] = result["fid_floor"]
        if "class_accuracy" in report:
            row["class_accuracy"] = report["class_accuracy"]
        if "nll" in report:
            row["bpd"], row["bpd_se"] = report["nll"]["bpd"], report["nll"]["bpd_se"]
        row["eval_s"] = time.perf_counter() - began
        return row


def score_model(
    scorer: RunScorer, trained: TrainedModel, writer: RunWriter, reporter: ProgressReporter
) -> dict[str, Any] | None:
    """<run>/eval/step_<step>/eval.json and a metrics row of FID / KID at the model's step. Like a grid, a
    score that fails costs a warning, not the run; a file that cannot be written stops it."""
    step = trained.step
    out = writer.run_dir / "eval" / f"step_{step:06d}"
    try:
        with writer.writing(out / "eval.json"):
            row = scorer.score(trained, step, out)
    except TrainingStopped:
        raise
    except Exception as e:  # noqa: BLE001 (a sampler or feature fault: the weights are saved)
        reporter.say(
            f"warning: step {step}: the model could not be scored ({type(e).__name__}: {e}); training goes "
            f"on; score it later with: ddpm-eval {shell_override('ckpt', writer.ckpt_dir / 'last.pt')}"
        )
        return None
    writer.metrics(row)
    writer.loss_plot()  # with this score in it
    reporter.say(f"step {step}: {format_scores(row)} -> {out / 'eval.json'}")
    return row


def format_scores(row: dict[str, Any]) -> str:
    spaces = [k.removeprefix("fid_") for k in row if k.startswith("fid_") and not k.startswith("fid_floor_")]
    parts = []
    for name in spaces:
        fid, floor = row[f"fid_{name}"], row.get(f"fid_floor_{name}")
        parts.append(f"{name} FID {fid:.3f}" if fid is not None else f"{name} FID n/a")
        if floor is not None:
            parts[-1] += f" (real vs real {floor:.3f})"
        kid = row[f"kid_{name}"]
        parts.append(f"KID {kid:.5f}" if kid is not None else "KID n/a (non-finite samples)")
    if row.get("class_accuracy") is not None:
        parts.append(f"class accuracy {row['class_accuracy']:.1%}")
    if row.get("bpd") is not None:
        parts.append(f"NLL <= {row['bpd']:.4f} bits/dim")
    return " | ".join(parts) + f" ({row['eval_s']:.1f} s)"


def job_needs_classifier(cfg: DictConfig, multirun: bool) -> bool:
    return scores_at_all(cfg, multirun) and "classifier" in cfg.eval.features


def prepare_classifier(cfg: DictConfig) -> Path | None:
    """Train and cache the classifier a job will score with, if it is not cached yet: called for every job
    of a sweep before the launcher starts them, so that parallel jobs read one finished cache file
    instead of each training its own. Returns the cache file; None for a data set without labels."""
    data = real_data_config(cfg.data)
    dataset = build_dataset(data, labels=cfg.class_cond)
    if not labelled(dataset):
        return None
    _, _, cache = classifier_for(cfg.eval, data, dataset)
    return cache
