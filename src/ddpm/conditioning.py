"""What a class-conditional model is asked for: labels given by index or by class name, the labels of a grid
with one row per class, and the guidance scales a checkpoint can take. Every refusal is one line that
names the bad value and the valid ones, raised before any image is drawn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from omegaconf import ListConfig

from ddpm.errors import ConfigError

if TYPE_CHECKING:
    from ddpm.trained import TrainedModel


def class_indices(spec: Any, class_names: Sequence[str], key: str = "labels") -> list[int]:
    """``labels=7``, ``labels=[0,1,2]`` or ``labels=[cat,dog]`` as class indices: an integer is an index
    into the sorted class names, a string a name."""
    items = list(spec) if isinstance(spec, list | tuple | ListConfig) else [spec]
    if not items:
        raise ConfigError(f"{key}=[] is invalid: give one or more classes, or {key}=null for every class")
    k = len(class_names)
    indices = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int | str):
            raise ConfigError(f"{key}: {item!r} is invalid: give class indices (0 ... {k - 1}) or names")
        if isinstance(item, int):
            if not 0 <= item < k:
                raise ConfigError(
                    f"{key}: class {item} is out of range: the model has {k} classes (0 ... {k - 1}: "
                    f"{_shown(class_names)})"
                )
            indices.append(item)
        elif item in class_names:
            indices.append(class_names.index(item))
        else:
            raise ConfigError(
                f"{key}: {item!r} is not a class of the model; its classes: {_shown(class_names)}"
            )
    return indices


def _shown(class_names: Sequence[str], n: int = 20) -> str:
    names = ", ".join(class_names[:n])
    return names + (f", ... ({len(class_names)} in all)" if len(class_names) > n else "")


def labels_in_rows(classes: Sequence[int], n: int, why: str = "labels") -> torch.Tensor:
    """n labels, n / k of each of the k ``classes`` in order: one grid row per class."""
    k = len(classes)
    if n % k:
        low, high = n // k * k, (n // k + 1) * k
        fix = f"n={low} or n={high}" if low else f"n={high}"
        raise ConfigError(
            f"n={n} is not a multiple of the {k} {why}, which get n / {k} images each (one grid row each): "
            f"give {fix}"
        )
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(n // k)


def grid_rows(num_classes: int, n: int) -> tuple[torch.Tensor, int]:
    """A training grid of at most n images with one row per class: every class where they fit (the first
    n otherwise), n // classes images each; the labels and the number of columns."""
    rows = min(num_classes, n)
    per_row = n // rows
    return labels_in_rows(list(range(rows)), rows * per_row), per_row


def check_guidance(trained: TrainedModel, scale: float | None, key: str = "guidance_scale") -> None:
    """An explicit guidance scale needs a conditional model whose null label was trained (cond_drop_prob >
    0) unless it is 1, the conditional model itself."""
    if scale is None:
        return
    if not math.isfinite(scale) or scale < 0:
        raise ConfigError(f"{key}={scale} is invalid: it must be a finite number >= 0")
    if trained.class_names is None:
        raise ConfigError(
            f"{key}={scale} is refused: the checkpoint is unconditional (trained with class_cond=false), so "
            "there is nothing to guide; leave guidance_scale unset"
        )
    if scale != 1 and not trained.null_trained:
        raise ConfigError(
            f"{key}={scale} is refused: the checkpoint was trained with cond_drop_prob=0, so its null label "
            "(the unconditional model that guidance needs) was never trained; only guidance_scale=1 works"
        )


# ddpm-sample's n=null: an 8x8 grid, or one row of 8 per class drawn
SAMPLE_N, SAMPLE_PER_CLASS = 64, 8


def sample_labels(
    trained: TrainedModel, spec: Any, n: int | None
) -> tuple[torch.Tensor | None, int | None, int]:
    """The labels ddpm-sample draws its images with, the grid's columns (None: the usual square grid) and
    how many images: the classes asked for, or every class in turn, one row each; None for an
    unconditional model. n=None: SAMPLE_N images, or SAMPLE_PER_CLASS of each class drawn."""
    if trained.class_names is None:
        if spec is not None:
            raise ConfigError(
                f"labels={_plain(spec)} is refused: the checkpoint is unconditional (trained with "
                "class_cond=false); train with class_cond=true to draw chosen classes"
            )
        return None, None, SAMPLE_N if n is None else n
    if spec is None:
        classes, why = list(range(len(trained.class_names))), "classes of the checkpoint (labels=null: all)"
    else:
        classes, why = class_indices(spec, trained.class_names), "labels"
    n = SAMPLE_PER_CLASS * len(classes) if n is None else n
    labels = labels_in_rows(classes, n, why)
    return labels, n // len(classes), n


def _plain(spec: Any) -> Any:
    return list(spec) if isinstance(spec, ListConfig) else spec
