"""Training images as tensors in [-1, 1], shaped (channels, image_size, image_size), from the data config."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ddpm.config import BadImages, ConfigError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)
DATASETS = ("digits", "folder", "mnist", "fashion_mnist", "cifar10")

# Grayscale modes wider than 8 bits: I;16* from 16-bit PNG and TIFF, I from 16-bit PGM and 32-bit TIFF.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})

# What PIL raises on a file it cannot decode (found by corrupting files of each format): OSError for
# truncated data and UnidentifiedImageError (an OSError) for no known format, SyntaxError for a broken
# PNG chunk, ValueError for a broken PPM header, DecompressionBombError for a header claiming a huge size.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SCAN_THREADS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding; more mostly adds memory


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
    """Every image under a folder that decodes, upright and in RGB or grayscale by ``data.channels``.

    Files that fail to decode are skipped with one warning (data.bad_images=skip) or stop the run
    (data.bad_images=error); ``skipped`` lists them."""

    def __init__(self, data: Any) -> None:
        root = Path(data.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root={data.root} is not a folder; give a folder of images")
        paths = find_images(root)
        if not paths:
            raise DataError(
                f"data.root={data.root} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        self.mode = pil_mode(data.channels)
        # eval builds a folder config from any data config, which may lack the folder-only keys
        self.background = int(_option(data, "background", 255))
        policy = BadImages(_option(data, "bad_images", BadImages.skip))
        # Every file is decoded once, here, rather than found bad when training first reads it: a bad file
        # would otherwise crash a DataLoader worker hours into a run, and the one warning needs the count
        # before training starts.
        reasons = scan_images(paths, self.mode, self.background)
        bad = {p: why for p, why in zip(paths, reasons, strict=True) if why is not None}
        if len(bad) == len(paths):
            raise DataError(
                f"data.root={data.root} holds no readable image ({len(paths)} image files failed to open: "
                f"{_first_bad(bad, root)})"
            )
        if bad and policy is BadImages.error:
            raise DataError(
                f"data.root={data.root}: {len(bad)} of {len(paths)} image files cannot be read: "
                f"{_first_bad(bad, root)}; fix or remove them, or skip them with data.bad_images=skip"
            )
        if bad:
            print(
                f"warning: data.root={data.root}: skipped {len(bad)} of {len(paths)} image files that cannot "
                f"be read: {_first_bad(bad, root)}",
                file=sys.stderr,
            )
        self.paths = [p for p in paths if p not in bad]
        self.skipped: list[Path] = list(bad)
        self.labels = None
        self.transform = image_transform(data)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(read_image(self.paths[i], self.mode, self.background))


def _option(data: Any, key: str, default: Any) -> Any:
    value = getattr(data, key, None)
    return default if value is None else value


def read_image(path: Path, mode: str, background: int) -> Image.Image:
    """The image in a file, decoded in full and converted by ``to_mode``."""
    with Image.open(path) as img:
        img.load()  # the whole file, so a truncated one fails here (PIL's open reads the header only)
        return to_mode(img, mode, background)


def to_mode(img: Image.Image, mode: str, background: int) -> Image.Image:
    """A new image, upright and in ``mode`` ("RGB" or "L"), the same way whatever the file's mode.

    PIL's plain convert() clips 16-bit grayscale to white and drops transparency onto whatever colour the
    file keeps under it (often black), so those two are done here first."""
    img = ImageOps.exif_transpose(img)  # phones store the rotation as a tag; also copies, so never the file's
    if img.mode in WIDE_GRAY_MODES:
        img = _gray_to_8bit(img)
    if img.mode in ALPHA_MODES or "transparency" in img.info:
        img = _composite(img, background)
    return img if img.mode == mode else img.convert(mode)


def _gray_to_8bit(img: Image.Image) -> Image.Image:
    """16- or 32-bit grayscale as 8-bit L, scaled by the full range of its bit depth.

    Mode I holds 16-bit data (PIL scales a 16-bit PGM to 0 ... 65535) as well as true 32-bit data, so I
    values that fit in 16 bits are taken as 16-bit, as the I;16 modes are."""
    a = np.asarray(img)  # numpy honours the byte order of I;16B
    if a.dtype.itemsize == 4 and (a.min() < 0 or a.max() > 65535):
        scaled = a.view(np.uint32) / ((2**32 - 1) / 255)  # PIL reads unsigned 32-bit into signed int32
    else:
        scaled = a / 257.0  # 65535 -> 255
    return Image.fromarray(np.rint(scaled).astype(np.uint8))


def _composite(img: Image.Image, background: int) -> Image.Image:
    """RGB, alpha-blended onto a uniform grey (data.background), so see-through pixels become one colour."""
    grey = Image.new("RGBA", img.size, (background, background, background, 255))
    return Image.alpha_composite(grey, img.convert("RGBA")).convert("RGB")


def scan_images(paths: list[Path], mode: str, background: int) -> list[str | None]:
    """For each file, None if it reads as a training image would, else why not."""
    with ThreadPoolExecutor(max_workers=SCAN_THREADS) as pool:
        return list(pool.map(lambda p: _why_unreadable(p, mode, background), paths))


def _why_unreadable(path: Path, mode: str, background: int) -> str | None:
    try:
        read_image(path, mode, background)
    except UnidentifiedImageError:
        return "cannot identify image file"  # PIL's message goes on with the full path
    except DECODE_ERRORS as e:
        return e.strerror if isinstance(e, OSError) and e.strerror else _first_line(e)  # strerror: no path
    return None


def _first_bad(bad: dict[Path, str], root: Path, n: int = 3) -> str:
    """The first n bad files, relative to root, with why each failed."""
    shown = [f"{p.relative_to(root)} ({why})" for p, why in list(bad.items())[:n]]
    return ", ".join(shown + (["..."] if len(bad) > n else []))


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
