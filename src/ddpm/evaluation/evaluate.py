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

from ddpm.checkpoint import output_base
from ddpm.conditioning import check_guidance
from ddpm.data import build_dataset, load_subset
from ddpm.data.folder import FolderDataset
from ddpm.diffusion.generate import generate
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.errors import ConfigError
from ddpm.evaluation.features import (
    Classifier,
    Extractor,
    classifier_features,
    inception_extractor,
    load_classifier,
    pixel_extractor,
    predict_classes,
)
from ddpm.evaluation.metrics import fid, kid, precision_recall
from ddpm.evaluation.nll import BoundSet, nll_text
from ddpm.files import write_atomically
from ddpm.images import save_grid
from ddpm.runtime import Runtime
from ddpm.trained import TrainedModel, image_shape, load_trained
from ddpm.validate import validate_eval


def real_data_config(data: Any) -> DictConfig:
    """The data config with random flips off: the reference set is scored as it is."""
    if OmegaConf.is_config(data):
        data = OmegaConf.to_container(data, resolve=True, enum_to_str=True)
    plain = OmegaConf.create(data)
    plain.hflip = False
    plain.num_workers = 0
    return plain


def default_out(cfg: Any, guidance: float | None = None) -> Path:
    """<run>/eval/<checkpoint>_seed<seed>, with _guidance<s> for a conditional model (so that the jobs of
    a sweep over guidance_scale write apart; for a pipeline folder ./eval/<folder>_seed<seed>), or
    eval_<folder> beside samples=DIR."""
    if cfg.ckpt is not None:
        base, name = output_base(Path(cfg.ckpt))
        scale = f"_guidance{guidance:g}" if guidance is not None else ""
        return base / "eval" / f"{name}_seed{cfg.seed}{scale}"
    samples = Path(cfg.samples)
    return samples.parent / f"eval_{samples.name}"


def generated_images(
    cfg: Any, device: torch.device, shape_from_ckpt: Sequence[str] = ()
) -> tuple[torch.Tensor | None, DictConfig, dict[str, Any], TrainedModel | None]:
    """The images of a folder to score (None for a checkpoint: its images are drawn once the scorer knows
    the labels to ask for), the data config of the real ones, a record of where the images come from, and
    the checkpoint's model. The keys of ``shape_from_ckpt`` (image_size, channels) of a data=folder set
    are the checkpoint's: a folder of real images is read at the model's shape unless told otherwise."""
    if cfg.ckpt is not None:
        trained = load_trained(cfg.ckpt, device, ema=cfg.ema)
        check_guidance(trained, cfg.guidance_scale)
        trained.diffusion.resolve_variance(cfg.ddpm_variance)  # learned on a fixed-variance model: refused
        if cfg.data is None and trained.source == "diffusers":
            raise ConfigError(
                f"ckpt={cfg.ckpt} is a diffusers pipeline, which records no data set: name the real images "
                "to score against with data= (e.g. data=cifar10 data.root=DIR, or data=folder data.root=DIR)"
            )
        data = real_data_config(cfg.data if cfg.data is not None else trained.data)
        if cfg.data is not None and data.name == "folder":
            own = {"channels": trained.shape[0], "image_size": trained.shape[1]}
            for key in shape_from_ckpt:
                data[key] = own[key]
        shape = image_shape(data)
        if trained.shape != shape:
            c, size = trained.shape[0], trained.shape[1]
            raise ConfigError(f"data={data.name} is {shape}, but ckpt={cfg.ckpt} makes {c}x{size}^2 images")
        sampling = SamplingOptions.from_config(cfg)
        source = {
            "ckpt": cfg.ckpt,
            "step": trained.step,
            "weights": trained.weights,
            "sampler": sampling.sampler,
            "sample_steps": sampling.steps(trained.diffusion.timesteps),
        }
        if trained.conditional:
            source["guidance_scale"] = trained.guidance(cfg.guidance_scale)
        return None, data, source, trained
    data = real_data_config(cfg.data)
    folder = FolderDataset(cfg.samples, data.image_size, data.channels, key="samples")
    images, _ = load_subset(folder, cfg.n, cfg.seed)
    return images, data, {"samples": cfg.samples}, None


def extractor(
    name: str, cfg: Any, device: torch.device, classifier: tuple[Classifier, float, Path] | None
) -> tuple[Extractor, dict]:
    if name == "inception":
        return inception_extractor(cfg.inception_weights, device), {}
    if name == "pixels":
        return pixel_extractor(), {}
    assert classifier is not None
    net, accuracy, cache = classifier
    return classifier_features(net), {"classifier_accuracy": accuracy, "classifier": str(cache)}


def classifier_for(cfg: Any, data: DictConfig, dataset: Any) -> tuple[Classifier, float, Path]:
    """The data set's classifier for this image shape: from its cache file, or trained once and cached."""
    size, c = data.image_size, data.channels
    root = cfg.classifier_cache or data.get("root") or "~/.cache/ddpm"
    cache = (
        Path(root).expanduser() / f"ddpm_classifier_{data.name}_{size}x{size}x{c}_{cfg.classifier_steps}.pt"
    )
    if cache.is_file():  # the training images are not even read
        net, accuracy = load_classifier(None, None, cache, cfg.classifier_steps, cfg.seed)
        return net, accuracy, cache
    images, labels = load_subset(dataset, cfg.classifier_images, cfg.seed + 1)
    net, accuracy = load_classifier(images, labels, cache, cfg.classifier_steps, cfg.seed)
    return net, accuracy, cache


def class_accuracy(
    net: Classifier, images: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str]
) -> tuple[float, dict[str, float | None]]:
    """The share of images the classifier assigns to their label, in all and per class (None for a class
    with no images)."""
    hit = (predict_classes(net, images) == labels).double()
    per_class = {
        name: float(hit[labels == i].mean()) if bool((labels == i).any()) else None
        for i, name in enumerate(class_names)
    }
    return float(hit.mean()), per_class


def score(real: torch.Tensor, fake: torch.Tensor, cfg: Any) -> tuple[dict[str, Any], str | None]:
    """FID, KID, precision and recall between two feature sets; FID is left out (with a warning) when a
    set has no more images than features, since its covariance would be singular."""
    dim, n = real.shape[1], min(real.shape[0], fake.shape[0])
    warning = None
    result: dict[str, Any] = {"dim": dim}
    bad = int((~torch.isfinite(fake).all(1)).sum())
    if bad:  # a diverged model's NaN images: no distance means anything, and eigh would fail on them
        none = dict.fromkeys(("fid", "kid", "kid_std", "precision", "recall"))
        return {**result, **none}, f"{bad} of {fake.shape[0]} images have non-finite features: no scores"
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
    generated images against them. ddpm-eval scores once; a training run at eval_every and at its end.

    With ``labels`` (a class-conditional model) the data set is read with its labels, the classifier is
    built whatever ``features`` says, and ``draw_labels`` gives the labels to ask the model for."""

    def __init__(
        self,
        cfg: Any,
        data: DictConfig,
        device: torch.device,
        features: Sequence[str] | None = None,
        labels: bool = False,
    ) -> None:
        self.cfg, self.data = cfg, data
        dataset = build_dataset(data, labels=labels)
        real, real_labels = load_subset(dataset, cfg.n_real, cfg.seed)
        # as many other real images as will be scored, where the set has them: what a perfect model gets
        other, _ = load_subset(dataset, cfg.n, cfg.seed, skip=real.shape[0])
        self.n_real = real.shape[0]
        self.labels: torch.Tensor | None = dataset.labels if labels else None
        self.class_names: tuple[str, ...] | None = tuple(dataset.classes) if labels else None
        names = list(features if features is not None else cfg.features)
        wanted = "classifier" in names or (labels and self.labels is not None)
        self.classifier = classifier_for(cfg, data, dataset) if wanted else None
        self.real_accuracy = None
        if labels and self.classifier is not None:
            self.real_accuracy = class_accuracy(self.classifier[0], real, real_labels, self.class_names)[0]
        floor = other.shape[0] == cfg.n
        self.spaces: dict[str, Space] = {}
        for name in names:
            extract, about = extractor(name, cfg, device, self.classifier)
            self.spaces[name] = Space(extract, extract(real), about, extract(other) if floor else None)

    def draw_labels(self, n: int, seed: int) -> torch.Tensor:
        """The labels of n real images picked with ``seed`` (all of them in turn where n is more than the
        set holds): the classes a conditional model is asked for, in the data set's proportions."""
        assert self.labels is not None
        order = torch.randperm(self.labels.shape[0], generator=torch.Generator().manual_seed(seed))
        return self.labels[order.repeat(-(-n // order.shape[0]))[:n]]

    def check_classes(self, trained: TrainedModel, key: str = "ckpt") -> None:
        if trained.class_names != self.class_names:
            raise ConfigError(
                f"{key}'s classes {list(trained.class_names or [])} are not those of data={self.data.name} "
                f"({list(self.class_names or [])}): the labels would ask for other classes"
            )

    def report(
        self, fake: torch.Tensor, source: dict[str, Any], labels: torch.Tensor | None = None
    ) -> tuple[dict[str, Any], list[str]]:
        """eval.json's content for these images (drawn given ``labels`` where the model is conditional),
        and the warnings of the feature spaces."""
        report: dict[str, Any] = {
            "source": source,
            "data": self.data.name,
            "n_fake": fake.shape[0],
            "n_real": self.n_real,
            "features": {},
        }
        if labels is not None and self.classifier is not None and self.class_names is not None:
            accuracy, per_class = class_accuracy(self.classifier[0], fake, labels, self.class_names)
            report["class_accuracy"] = accuracy
            report["class_accuracy_per_class"] = per_class
            report["class_accuracy_real"] = self.real_accuracy
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


def write_report(report: dict[str, Any], fake: torch.Tensor | None, out: Path) -> None:
    """<out>/samples.png (the first 64 images, where images were drawn) and <out>/eval.json."""
    if fake is not None:
        save_grid(fake[:64], out / "samples.png")
    write_atomically(out / "eval.json", lambda f: f.write((json.dumps(report, indent=2) + "\n").encode()))


def evaluate(cfg: Any, shape_from_ckpt: Sequence[str] = ()) -> dict[str, Any]:
    """Score as cfg says and write eval.json; every check runs before any work. ``shape_from_ckpt``: the
    data=folder shape keys the command line left out, which the checkpoint gives (generated_images)."""
    validate_eval(cfg)
    device = Runtime.from_config(cfg).device
    fake, data, source, trained = generated_images(cfg, device, shape_from_ckpt)
    bound = None
    if cfg.nll:  # read before any image is drawn: a bad split or folder fails first
        assert trained is not None  # validate_eval: nll=true needs ckpt=
        bound = BoundSet.read(
            cfg,
            data,
            trained.diffusion.learn_sigma,
            labels=trained.conditional,
            default=trained.diffusion.sampling_variance,
        )
    report: dict[str, Any] = {"source": source, "data": data.name}
    warnings: list[str] = []
    if cfg.features:
        conditional = trained is not None and trained.conditional
        scorer = Scorer(cfg, data, device, labels=conditional)
        labels = None
        if trained is not None:
            if conditional:
                scorer.check_classes(trained)
                labels = scorer.draw_labels(cfg.n, cfg.seed)
            sampling = SamplingOptions.from_config(cfg)
            fake = generate(trained, sampling, cfg.n, cfg.seed, cfg.batch_size, labels)
        report, warnings = scorer.report(fake, source, labels)
    if bound is not None and trained is not None:
        report["nll"] = bound.report(trained, cfg.batch_size, cfg.seed)
    for warning in warnings:
        print(f"ddpm-eval: warning: {warning}")
    out = Path(cfg.out) if cfg.out is not None else default_out(cfg, source.get("guidance_scale"))
    write_report(report, fake, out)
    report["out"] = str(out)
    return report


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [nll_text(report["nll"])] if "nll" in report else []
    if report.get("class_accuracy") is not None:
        real = report.get("class_accuracy_real")
        ceiling = f" (real images {real:.1%})" if real is not None else ""
        guidance = report["source"].get("guidance_scale")
        at = f" at guidance {guidance:g}" if guidance is not None else ""
        lines.append(f"class accuracy{at}: {report['class_accuracy']:.1%}{ceiling}")
    for name, r in report.get("features", {}).items():
        fid_text = f"{r['fid']:.3f}" if r["fid"] is not None else "n/a"
        if r.get("fid_floor") is not None:
            fid_text += f" (real vs real {r['fid_floor']:.3f})"
        acc = f" (classifier accuracy {r['classifier_accuracy']:.1%})" if "classifier_accuracy" in r else ""
        if r["kid"] is None:  # non-finite samples: score() warned
            lines.append(f"{name}{acc}: no scores (non-finite samples)")
            continue
        lines.append(
            f"{name}{acc}: FID {fid_text} | KID {r['kid']:.5f} +- {r['kid_std']:.5f} | "
            f"precision {r['precision']:.3f} | recall {r['recall']:.3f}"
        )
    return lines


def written_line(report: dict[str, Any]) -> str:
    """What was scored and bounded, and where eval.json went."""
    scored = f"{report['n_fake']} images against {report['n_real']} real ones" if "n_fake" in report else ""
    bound = f"the bound on {report['nll']['n']} real images" if "nll" in report else ""
    return f"{' and '.join(filter(None, [scored, bound]))} -> {report['out']}/eval.json"
