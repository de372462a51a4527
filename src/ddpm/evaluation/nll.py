"""The negative log-likelihood bound of a trained model on real images, in bits per dimension: which images
(the set's test split where it has one), the bound over them in batches, and eval.json's "nll" record."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from ddpm.data import Split, build_dataset, has_test_split, load_subset
from ddpm.data.folder import FolderDataset, check_eight_bit
from ddpm.diffusion.gaussian import Variance, resolve_variance
from ddpm.diffusion.likelihood import calc_bpd
from ddpm.diffusion.sampling import SamplingOptions
from ddpm.errors import ConfigError
from ddpm.trained import TrainedModel


def resolve_split(split: Split, data: Any, key: str = "nll_split") -> str:
    """ "train" or "test" for data config ``data``: auto takes the test split where there is one."""
    if split is Split.auto:
        return "test" if has_test_split(data) else "train"
    if split is Split.test and not has_test_split(data):
        raise ConfigError(
            f"{key}=test: data={data.name} has no test split; choose {key}=train or {key}=auto "
            "(the test split where there is one: mnist, fashion_mnist, cifar10)"
        )
    return split.value


def nll_images(
    data: Any, split: str, n: int, seed: int, labels: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images of the split (all of them where it has fewer), picked with ``seed``, with their labels
    where ``labels``. Folder images must have 8 bits per channel: the decoder term assumes 256 levels."""
    dataset: Dataset = build_dataset(data, labels=labels, split=split)
    if isinstance(dataset, FolderDataset):
        check_eight_bit(dataset.paths, data.root)
    return load_subset(dataset, n, seed)


@dataclass(frozen=True)
class BoundSet:
    """What a bound is measured on, read once: the real images, their labels, the variance and the split.
    ddpm-eval reads it before drawing any sample, a run before its first step (so a bad split or folder
    fails before any work), and ``report`` bounds a model on it."""

    images: torch.Tensor
    labels: torch.Tensor | None
    variance: Variance
    split: str

    @classmethod
    def read(
        cls,
        cfg: Any,
        data: Any,
        learn_sigma: bool,
        labels: bool,
        key: str = "nll_split",
        default: Variance = Variance.auto,
    ) -> BoundSet:
        """From the scoring keys ``cfg`` (ddpm-eval's, or a run's eval.*: nll_split, nll_n, seed and
        ddpm_variance) for a model with or without ``learn_sigma``; ``labels`` for a conditional one;
        ``default``: what ddpm_variance=auto means for it (Diffusion.sampling_variance)."""
        split = resolve_split(Split(cfg.nll_split), data, key)
        images, image_labels = nll_images(data, split, cfg.nll_n, cfg.seed, labels)
        variance = resolve_variance(SamplingOptions.from_config(cfg).ddpm_variance, learn_sigma, default)
        return cls(images, image_labels, variance, split)

    @torch.no_grad()
    def report(self, trained: TrainedModel, batch_size: int, seed: int) -> dict[str, Any]:
        """The bound of each image (given its own label where the model is conditional) over all T steps,
        and its mean and standard error over the images: eval.json's "nll"."""
        device = trained.diffusion.schedule.betas.device
        generator = torch.Generator(device=device).manual_seed(seed)
        was_training = trained.network.training
        trained.network.eval()
        parts: dict[str, list[torch.Tensor]] = {"bpd": [], "prior_bpd": [], "decoder_bpd": []}
        for start in range(0, self.images.shape[0], batch_size):
            x0 = self.images[start : start + batch_size].to(device)
            labels = self.labels[start : start + batch_size].to(device) if trained.conditional else None
            # the bound of the model itself: conditional on the image's label, never guided
            denoise = trained.denoiser(clip_x0=True, labels=labels, guidance_scale=1.0)
            bound = calc_bpd(trained.diffusion, denoise, x0, self.variance, generator)
            for name in parts:
                parts[name].append(getattr(bound, name).double().cpu())
        trained.network.train(was_training)
        per_image = {name: torch.cat(chunks) for name, chunks in parts.items()}
        bpd, n = per_image["bpd"], self.images.shape[0]
        se = float(bpd.std(unbiased=True)) / math.sqrt(n) if n > 1 else None
        return {
            "bpd": float(bpd.mean()),
            "bpd_se": se,
            "prior_bpd": float(per_image["prior_bpd"].mean()),
            "decoder_bpd": float(per_image["decoder_bpd"].mean()),
            "n": n,
            "split": self.split,
            "T": trained.diffusion.timesteps,
            "variance": self.variance.name,
            "weights": trained.weights,
        }


def nll_text(nll: dict[str, Any]) -> str:
    """One line of the bound for the command's output."""
    se = f" +- {nll['bpd_se']:.4f}" if nll["bpd_se"] is not None else ""
    return (
        f"NLL <= {nll['bpd']:.4f}{se} bits/dim on {nll['n']} {nll['split']} images (prior "
        f"{nll['prior_bpd']:.4f}, decoder {nll['decoder_bpd']:.4f}; T={nll['T']}, {nll['variance']} "
        f"variance, {nll['weights']} weights)"
    )
