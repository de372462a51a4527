"""``evaluate(cfg)``: score a checkpoint's samples (or a folder of images) against a data set's real
images in one or more feature spaces, and write ``eval.json``."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ddpm.checkpoint import run_dir_of
from ddpm.data import build_dataset, load_subset
from ddpm.data.folder import FolderDataset
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.errors import ConfigError
from ddpm.evaluation.features import (
    Extractor,
    classifier_extractor,
    inception_extractor,
    pixel_extractor,
)
from ddpm.evaluation.metrics import fid, kid, precision_recall
from ddpm.files import write_atomically
from ddpm.images import save_grid
from ddpm.runtime import Runtime
from ddpm.trained import image_shape, load_trained
from ddpm.validate import validate_eval


def real_data_config(data: Any) -> DictConfig:
    """The data config with random flips off: the reference set is scored as it is."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True, enum_to_str=True)
    plain = OmegaConf.create(data)
    plain.hflip = False
    plain.num_workers = 0
    return plain


def default_out(cfg: Any) -> Path:
    if cfg.ckpt is not None:
        ckpt = Path(cfg.ckpt)
        return run_dir_of(ckpt) / "eval" / f"{ckpt.stem}_seed{cfg.seed}"
    samples = Path(cfg.samples)
    return samples.parent / f"eval_{samples.name}"


def generated_images(cfg: Any, device: torch.device) -> tuple[torch.Tensor, DictConfig, dict[str, Any]]:
    """The images to score, the data config of the real ones, and a record of where the images came from."""
    if cfg.ckpt is not None:
        trained = load_trained(cfg.ckpt, device, ema=cfg.ema)
        data = real_data_config(cfg.data if cfg.data is not None else trained.data)
        shape = image_shape(data)
        if trained.shape != shape:
            c, size = trained.shape[0], trained.shape[1]
            raise ConfigError(f"data={data.name} is {shape}, but ckpt={cfg.ckpt} makes {c}x{size}^2 images")
        sampling = SamplingOptions.from_config(cfg)
        images = generate(trained, sampling, cfg.n, cfg.seed, cfg.batch_size)
        source = {
            "ckpt": cfg.ckpt,
            "step": trained.step,
            "weights": trained.weights,
            "sampler": sampling.sampler,
            "sample_steps": sampling.steps(trained.diffusion.timesteps),
        }
        return images, data, source
    data = real_data_config(cfg.data)
    folder = FolderDataset(cfg.samples, data.image_size, data.channels, key="samples")
    images, _ = load_subset(folder, cfg.n, cfg.seed)
    return images, data, {"samples": cfg.samples}


def extractor(
    name: str, cfg: Any, data: DictConfig, dataset: Any, device: torch.device
) -> tuple[Extractor, dict]:
    if name == "inception":
        return inception_extractor(cfg.inception_weights, device), {}
    if name == "pixels":
        return pixel_extractor(), {}
    extract, accuracy, cache = classifier_for(cfg, data, dataset)
    return extract, {"classifier_accuracy": accuracy, "classifier": str(cache)}


def classifier_for(cfg: Any, data: DictConfig, dataset: Any) -> tuple[Extractor, float, Path]:
    """The data set's classifier for this image shape: from its cache file, or trained once and cached."""
    size, c = data.image_size, data.channels
    root = cfg.classifier_cache or data.get("root") or "~/.cache/ddpm"
    cache = (
        Path(root).expanduser() / f"ddpm_classifier_{data.name}_{size}x{size}x{c}_{cfg.classifier_steps}.pt"
    )
    if cache.is_file():  # the training images are not even read
        extract, accuracy = classifier_extractor(None, None, cache, cfg.classifier_steps, cfg.seed)
        return extract, accuracy, cache
    images, labels = load_subset(dataset, cfg.classifier_images, cfg.seed + 1)
    extract, accuracy = classifier_extractor(images, labels, cache, cfg.classifier_steps, cfg.seed)
    return extract, accuracy, cache


def score(real: torch.Tensor, fake: torch.Tensor, cfg: Any) -> tuple[dict[str, Any], str | None]:
    """FID, KID, precision and recall between two feature sets; FID is left out (with a warning) when a
    set has no more images than features, since its covariance would be singular."""
    dim, n = real.shape[1], min(real.shape[0], fake.shape[0])
    warning = None
    result: dict[str, Any] = {"dim": dim}
    if n > dim:
        result["fid"] = fid(real, fake)
    else:
        result["fid"] = None
        warning = (
            f"FID needs more images than the {dim} features for a full-rank covariance "
            f"(got {n}); reporting KID, precision and recall only"
        )
    result["kid"], result["kid_std"] = kid(real, fake, cfg.kid_subsets, cfg.kid_subset_size, cfg.seed)
    result["precision"], result["recall"] = precision_recall(real, fake, cfg.knn_k)
    return result, warning


@dataclass
class Space:
    """A feature space: its feature function, the real images' features in it, and what to report of it."""

    extract: Extractor
    real: torch.Tensor
    about: dict[str, Any]
    other: torch.Tensor | None  # features of real images outside ``real``: the real-vs-real floor


class Scorer:
    """The real images' features in each feature space, computed once; ``report(fake)`` scores a set of
    generated images against them. ddpm-eval scores once; a training run at eval_every and at its end."""

    def __init__(
        self, cfg: Any, data: DictConfig, device: torch.device, features: Sequence[str] | None = None
    ) -> None:
        self.cfg, self.data = cfg, data
        dataset = build_dataset(data)
        real, _ = load_subset(dataset, cfg.n_real, cfg.seed)
        # as many other real images as will be scored, where the set has them: what a perfect model gets
        other, _ = load_subset(dataset, cfg.n, cfg.seed, skip=real.shape[0])
        self.n_real = real.shape[0]
        floor = other.shape[0] == cfg.n
        self.spaces: dict[str, Space] = {}
        for name in features if features is not None else cfg.features:
            extract, about = extractor(name, cfg, data, dataset, device)
            self.spaces[name] = Space(extract, extract(real), about, extract(other) if floor else None)

    def report(self, fake: torch.Tensor, source: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """eval.json's content for these images, and the warnings of the feature spaces."""
        report: dict[str, Any] = {
            "source": source,
            "data": self.data.name,
            "n_fake": fake.shape[0],
            "n_real": self.n_real,
            "features": {},
        }
        warnings = []
        for name, space in self.spaces.items():
            result, warning = score(space.real, space.extract(fake), self.cfg)
            if warning:
                warnings.append(f"{name}: {warning}")
            if space.other is not None:  # the floor of FID and KID at this many images
                floor, _ = score(space.real, space.other, self.cfg)
                result["fid_floor"], result["kid_floor"] = floor["fid"], floor["kid"]
            report["features"][name] = {**result, **space.about}
        return report, warnings


def write_report(report: dict[str, Any], fake: torch.Tensor, out: Path) -> None:
    """<out>/samples.png (the first 64 images) and <out>/eval.json."""
    save_grid(fake[:64], out / "samples.png")
    write_atomically(out / "eval.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))


def evaluate(cfg: Any) -> dict[str, Any]:
    """Score as cfg says and write eval.json; every check runs before any work."""
    validate_eval(cfg)
    device = Runtime.from_config(cfg).device
    fake, data, source = generated_images(cfg, device)
    report, warnings = Scorer(cfg, data, device).report(fake, source)
    for warning in warnings:
        print(f"ddpm-eval: warning: {warning}")
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg)
    write_report(report, fake, out)
    report["out"] = str(out)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, r in report["features"].items():
        fid_text = f"{r['fid']:.3f}" if r["fid"] is not None else "n/a"
        if r.get("fid_floor") is not None:
            fid_text += f" (real vs real {r['fid_floor']:.3f})"
        acc = f" (classifier accuracy {r['classifier_accuracy']:.1%})" if "classifier_accuracy" in r else ""
        lines.append(
            f"{name}{acc}: FID {fid_text} | KID {r['kid']:.5f} +- {r['kid_std']:.5f} | "
            f"precision {r['precision']:.3f} | recall {r['recall']:.3f}"
        )
    return lines
