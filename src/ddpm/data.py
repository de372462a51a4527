"""Training images as tensors in [-1, 1], shaped (channels, image_size, image_size), from the data config."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ddpm.config import ConfigError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
DATASETS = ("digits", "folder", "mnist", "fashion_mnist", "cifar10")


class DataError(ConfigError):
    """The data named by the config cannot be read; the message says why and what to do."""


def image_transform(data: Any) -> Callable[[Any], torch.Tensor]:
    """PIL image or uint8 tensor -> float tensor in [-1, 1]: resize the short side, centre-crop.

    Deterministic: the random flips (data.hflip) are drawn by the data order (order.py), so that a resumed
    run sees the same images. Built from picklable parts only, so DataLoader workers can receive it under
    any start method."""
    half = [0.5] * data.channels
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(data.image_size, antialias=True),
            v2.CenterCrop(data.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=half, std=half),  # [0, 1] -> [-1, 1]
        ]
    )


def pil_mode(channels: int) -> str:
    return "RGB" if channels == 3 else "L"


class DigitsDataset(Dataset):
    """The 1,797 8x8 handwritten digits that ship with scikit-learn (intensities 0 ... 16)."""

    def __init__(self, data: Any) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        pixels = torch.from_numpy(digits.images).float()  # (N, 8, 8) in [0, 16]
        self.labels = torch.from_numpy(digits.target).long()
        images = (pixels / 16.0 * 255.0).round().to(torch.uint8)[:, None]  # (N, 1, 8, 8)
        self.images = images.expand(-1, data.channels, -1, -1) if data.channels == 3 else images
        self.transform = image_transform(data)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.images[i])


def find_images(root: Path) -> list[Path]:
    """Every file under root (recursively) whose extension, in any case, is an image format."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


class FolderDataset(Dataset):
    """Every image under a folder, converted to RGB or grayscale by ``data.channels``."""

    def __init__(self, data: Any) -> None:
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root={data.root} is not a folder; give a folder of images")
        paths = find_images(root)
        if not paths:
            raise DataError(
                f"data.root={data.root} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        readable = next((p for p in paths if _readable(p)), None)
        if readable is None:
            raise DataError(
                f"data.root={data.root} holds no readable image ({len(paths)} image files failed to open)"
            )
        self.paths = paths
        self.labels = None
        self.mode = pil_mode(data.channels)
        self.transform = image_transform(data)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as img:
            return self.transform(img.convert(self.mode))


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as img:
            img.load()
        return True
    except (OSError, UnidentifiedImageError):
        return False


class TorchvisionDataset(Dataset):
    """MNIST, Fashion-MNIST or CIFAR-10 (training split) through torchvision, kept as PIL images."""

    def __init__(self, data: Any) -> None:
        from torchvision import datasets

        cls = {"mnist": datasets.MNIST, "fashion_mnist": datasets.FashionMNIST, "cifar10": datasets.CIFAR10}
        root = Path(data.root).expanduser()
        try:
            self.base = cls[data.name](str(root), train=True, download=data.download)
        except (RuntimeError, OSError) as e:  # torchvision: "Dataset not found"; urllib: no network
            how = (
                "could not be downloaded (no network?)"
                if data.download
                else "is not there (data.download=false)"
            )
            raise DataError(
                f"data={data.name}: the data set in data.root={data.root} {how}: {_first_line(e)}; "
                "copy the files there, or train offline with data=folder data.root=DIR or data=digits"
            ) from e
        self.labels = torch.as_tensor(self.base.targets).long()
        self.mode = pil_mode(data.channels)
        self.transform = image_transform(data)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> torch.Tensor:
        img, _ = self.base[i]
        return self.transform(img.convert(self.mode))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def build_dataset(data: Any) -> Dataset:
    """The data set of a ``data`` config entry; raises DataError, before any work, if it cannot be read."""
    if data.name == "digits":
        return DigitsDataset(data)
    if data.name == "folder":
        return FolderDataset(data)
    if data.name in ("mnist", "fashion_mnist", "cifar10"):
        return TorchvisionDataset(data)
    raise ConfigError(f"data.name={data.name!r} is invalid: choose one of {', '.join(DATASETS)}")


def load_subset(dataset: Dataset, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images (all, if the set is smaller) drawn without replacement, and their labels where known."""
    g = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(dataset), generator=g)[: min(n, len(dataset))]
    images = torch.stack([dataset[int(i)] for i in index])
    labels = getattr(dataset, "labels", None)
    return images, (labels[index] if labels is not None else None)
