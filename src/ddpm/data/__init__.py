"""Training images as tensors in [-1, 1], shaped (channels, image_size, image_size), each with its class
label where the set has labels (an ``Item``): the ``data`` config group, one registered option per set."""

from __future__ import annotations

from enum import Enum
from typing import Any

import torch
from torch.utils.data import Dataset

from ddpm import checks
from ddpm.data.batch import Batch
from ddpm.data.folder import FolderData, folder_dataset
from ddpm.data.sets import (
    BuildDataset,
    CheckData,
    DataConfig,
    DigitsDataset,
    TorchvisionData,
    TorchvisionDataset,
)
from ddpm.errors import ConfigError
from ddpm.registry import Option, Registry


def check_folder(data: Any) -> None:
    if not 0 <= data.background <= 255:
        raise ConfigError(f"data.background={data.background} is invalid: it must lie in [0, 255]")


DATASETS: Registry[BuildDataset, CheckData] = Registry(
    "data",
    Option("digits", DataConfig, DigitsDataset),
    Option("folder", FolderData, folder_dataset, check_folder),
    Option("mnist", TorchvisionData, TorchvisionDataset, schema_name="torchvision"),
    Option("fashion_mnist", TorchvisionData, TorchvisionDataset, schema_name="torchvision"),
    Option("cifar10", TorchvisionData, TorchvisionDataset, schema_name="torchvision"),
)


def check_data(data: Any) -> None:
    option = DATASETS[data.name]
    checks.at_least("data.image_size", data.image_size, 1)
    checks.one_of("data.channels", data.channels, (1, 3))
    checks.at_least("data.num_workers", data.num_workers, 0)
    # true / false arrive as bools (Hydra's parser, YAML); a number must not pass as one
    if not (isinstance(data.on_device, bool) or data.on_device == "auto"):
        raise ConfigError(f"data.on_device={data.on_device!r} is invalid: choose one of auto, true, false")
    checks.at_least("data.on_device_max_mb", data.on_device_max_mb, 0)
    option.check(data)


class Split(Enum):
    """Which images of a set the likelihood is measured on."""

    auto = "auto"  # the test split where the set has one, else the training images
    train = "train"
    test = "test"


# The sets with a test split of their own (torchvision's train=False); the others are training images only.
TEST_SPLITS = ("mnist", "fashion_mnist", "cifar10")


def has_test_split(data: Any) -> bool:
    return data.name in TEST_SPLITS


def build_dataset(data: Any, labels: bool = False, split: str = "train") -> Dataset:
    """The data set of a ``data`` config entry, its images labelled by class where ``labels`` asks (a
    class-conditional run; a set that has none says so); ``split="test"`` the set's test split (only where
    ``has_test_split``). Raises DataError, before any work, if it cannot be read."""
    if split == "test":
        if not has_test_split(data):
            raise ValueError(f"data={data.name} has no test split")
        return TorchvisionDataset(data, labels, train=False)
    return DATASETS[data.name].build(data, labels)


def load_subset(
    dataset: Dataset, n: int, seed: int, skip: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images (as many as there are, if the set is smaller) drawn without replacement, and their labels
    where known; ``skip`` passes over the first draws of the same seed, for a subset disjoint from them."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[skip : skip + n]
    batch = Batch.collate([dataset[int(i)] for i in index])
    return batch.images, batch.labels
