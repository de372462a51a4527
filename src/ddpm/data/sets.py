"""The data sets with their own format (the ``data`` config group's digits, mnist, fashion_mnist and
cifar10), the schemas of the group, and the transform every set shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from omegaconf import MISSING
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ddpm.data.batch import Item
from ddpm.errors import DataError
from ddpm.keys import resumable


@dataclass
class DataConfig:
    name: str = MISSING
    image_size: int = MISSING
    channels: int = MISSING
    hflip: bool = MISSING
    num_workers: int = resumable(named=False)
    # auto, true or false (Any: Hydra reads true / false as bools); both paths give the very same batches
    on_device: Any = resumable(named=False)
    on_device_max_mb: float = resumable(named=False)


@dataclass
class TorchvisionData(DataConfig):
    root: str = resumable()  # the files may move between a run and its resume
    download: bool = resumable()


class BuildDataset(Protocol):
    """A data option's builder: its config entry -> the data set (DataError if it cannot be read). With
    ``labels`` the set must give each image its class (a class-conditional run), or say why it cannot.
    Every set has ``classes``: its class names, label i naming classes[i], or None without labels."""

    def __call__(self, data: Any, labels: bool = False) -> Dataset: ...


class CheckData(Protocol):
    """A data option's own checks of its config entry, after the ones every set shares."""

    def __call__(self, data: Any) -> None: ...


def image_transform(image_size: int, channels: int) -> Callable[[Any], torch.Tensor]:
    """PIL image or uint8 tensor -> float tensor in [-1, 1]: resize the short side, centre-crop.

    Deterministic: the random flips (data.hflip) are drawn by the data order (order.py), so that a resumed
    run sees the same images. Built from picklable parts only, so DataLoader workers can receive it under
    any start method."""
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(image_size, antialias=True),
            v2.CenterCrop(image_size),
            to_unit_range(channels),
        ]
    )


def to_unit_range(channels: int) -> v2.Compose:
    """uint8 image -> float32 in [-1, 1]: the transform's last part, which the images held on the device
    (resident.py) go through as well, so that both paths give the same floats to the bit."""
    half = [0.5] * channels
    return v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=half, std=half)]  # [0, 1] -> [-1, 1]
    )


def pil_mode(channels: int) -> str:
    return "RGB" if channels == 3 else "L"


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class DigitsDataset(Dataset):
    """The 1,797 8x8 handwritten digits that ship with scikit-learn (intensities 0 ... 16)."""

    classes = tuple(str(i) for i in range(10))

    def __init__(self, data: Any, labels: bool = False) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.from_numpy(digits.images).float()  # (N, 8, 8) in [0, 16]
        self.labels = torch.from_numpy(digits.target).long()
        images = (pixels / 16.0 * 255.0).round().to(torch.uint8)[:, None]  # (N, 1, 8, 8)
        self.images = images.expand(-1, data.channels, -1, -1) if data.channels == 3 else images
        self.transform = image_transform(data.image_size, data.channels)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> Item:
        return self.transform(self.images[i]), int(self.labels[i])


class TorchvisionDataset(Dataset):
    """MNIST, Fashion-MNIST or CIFAR-10 (the training split, or with ``train=False`` the test split) through
    torchvision, kept as PIL images; the class names are torchvision's (MNIST's "0 - zero", Fashion-MNIST's
    "T-shirt/top", CIFAR-10's "airplane")."""

    def __init__(self, data: Any, labels: bool = False, train: bool = True) -> None:
        from torchvision import datasets

        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
        root = Path(data.root).expanduser()
        try:
            self.base = cls[data.name](str(root), train=train, download=data.download)
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found"; urllib: no network
            how = (
                "could not be downloaded (no network?)"
                if data.download
                else "is not there (data.download=false)"
            )
            raise DataError(
                f"data={data.name}: the data set in data.root={data.root} {how}: {first_line(e)}; "
                "copy the files there, or train offline with data=folder data.root=DIR or data=digits"
            ) from e
        self.labels = torch.as_tensor(self.base.targets).long()
        self.classes = tuple(self.base.classes)
        self.mode = pil_mode(data.channels)
        self.transform = image_transform(data.image_size, data.channels)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> Item:
        img, label = self.base[i]
        return self.transform(img.convert(self.mode)), int(label)
