"""A folder of images as a data set (``data=folder``): every file decoded once at start, bad files skipped
or refused, and every mode converted the same way."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ddpm.data.batch import Item
from ddpm.data.sets import DataConfig, first_line, image_transform, pil_mode
from ddpm.errors import DataError
from ddpm.keys import resumable

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
)

# Grayscale modes wider than 8 bits: I;16* from 16-bit PNG and TIFF, I from 16-bit PGM and 32-bit TIFF.
WIDE_GRAY_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})
ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Modes with more than 8 bits a channel: the wide grayscale ones, and 32-bit float.
WIDE_MODES = WIDE_GRAY_MODES | {"I;16S", "I;32", "I;32S", "F"}

# What PIL raises on a file it cannot decode (found by corrupting files of each format): OSError for
# truncated data and UnidentifiedImageError (an OSError) for no known format, SyntaxError for a broken
# PNG chunk, ValueError for a broken PPM header, DecompressionBombError for a header claiming a huge size.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
SCAN_THREADS = min(8, os.cpu_count() or 1)  # PIL releases the GIL while decoding; more mostly adds memory


class BadImages(Enum):
    """What a folder data set does with files that fail to decode (truncated, corrupt, not an image)."""

    skip = "skip"
    error = "error"


@dataclass
class FolderData(DataConfig):
    root: str = resumable()  # the files may move between a run and its resume
    bad_images: BadImages = resumable()
    background: int = MISSING  # grey level that transparent pixels are composited onto


def find_images(root: Path) -> list[Path]:
    """Every file under root (recursively) whose extension, in any case, is an image format."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def folder_classes(root: Path, paths: list[Path], shown: str, key: str) -> tuple[tuple[str, ...], list[int]]:
    """The class names (the sorted names of root's subfolders: torchvision's ImageFolder convention) and
    each image's label, the index of the subfolder it lies under (at any depth)."""
    top = [p.relative_to(root) for p in paths if p.parent == root]
    if top:
        named = ", ".join(str(p) for p in top[:3]) + (", ..." if len(top) > 3 else "")
        raise DataError(
            f"class_cond=true needs one subfolder per class in {key}={shown}, but it holds images at its "
            f"top level ({named}): move them into <class>/ folders, or train with class_cond=false"
        )
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    kinds = [p.relative_to(root).parts[0] for p in paths]
    empty = [name for name in folders if name not in set(kinds)]
    if empty:
        raise DataError(
            f"class_cond=true: the class folder {key}={shown}/{empty[0]} holds no images; every "
            "subfolder of the root is a class and needs images (remove it, or add some)"
        )
    if len(folders) < 2:
        raise DataError(
            f"class_cond=true needs two or more classes, but {key}={shown} has one subfolder "
            f"({folders[0]}); give one subfolder per class"
        )
    index = {name: i for i, name in enumerate(folders)}
    return tuple(folders), [index[kind] for kind in kinds]


class FolderDataset(Dataset):
    """Every image under a folder that decodes, upright and in RGB or grayscale by ``data.channels``;
    with ``labels``, each labelled by the subfolder of the root it lies in (``classes``: their sorted
    names).

    Files that fail to decode are skipped with one warning (data.bad_images=skip) or stop the run
    (data.bad_images=error); ``skipped`` lists them."""

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        bad_images: BadImages = BadImages.skip,
        background: int = 255,
        key: str = "data.root",
        labels: bool = False,
    ) -> None:
        shown = root  # as the user wrote it, under the config key that gave it
        root = Path(root).expanduser()
        if not root.is_dir():
            raise DataError(f"{key}={shown} is not a folder; give a folder of images")
        paths = find_images(root)
        if not paths:
            raise DataError(
                f"{key}={shown} holds no images (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        # the classes come from every image file, readable or not, so a bad file cannot drop a class
        self.classes, file_labels = folder_classes(root, paths, shown, key) if labels else (None, None)
        self.mode = pil_mode(channels)
        self.background = int(background)
        policy = BadImages(bad_images)
        # Every file is decoded once, here, rather than found bad when training first reads it: a bad file
        # would otherwise crash a DataLoader worker hours into a run, and the one warning needs the count
        # before training starts.
        reasons = scan_images(paths, self.mode, self.background)
        bad = {p: why for p, why in zip(paths, reasons, strict=True) if why is not None}
        if len(bad) == len(paths):
            raise DataError(
                f"{key}={shown} holds no readable image ({len(paths)} image files failed to open: "
                f"{_first_bad(bad, root)})"
            )
        if bad and policy is BadImages.error:
            raise DataError(
                f"{key}={shown}: {len(bad)} of {len(paths)} image files cannot be read: "
                f"{_first_bad(bad, root)}; fix or remove them, or skip them with data.bad_images=skip"
            )
        if bad:
            print(
                f"warning: {key}={shown}: skipped {len(bad)} of {len(paths)} image files that cannot "
                f"be read: {_first_bad(bad, root)}",
                file=sys.stderr,
            )
        self.paths = [p for p in paths if p not in bad]
        self.skipped: list[Path] = list(bad)
        self.labels = (
            torch.tensor([y for p, y in zip(paths, file_labels, strict=True) if p not in bad])
            if file_labels is not None
            else None
        )
        self.transform = image_transform(image_size, channels)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> Item:
        image = self.transform(read_image(self.paths[i], self.mode, self.background))
        return image, int(self.labels[i]) if self.labels is not None else None


def check_eight_bit(paths: list[Path], root: str, key: str = "data.root") -> None:
    """Every image has 8 bits per channel, as the likelihood's decoder term needs (256 levels); a wider
    one is refused, not converted, since its bound would be of other data."""
    for path in paths:
        with Image.open(path) as img:  # the header only
            if img.mode in WIDE_MODES:
                raise DataError(
                    f"{key}={root}: {path.name} has more than 8 bits per channel (PIL mode {img.mode}); "
                    "the bound in bits/dim assumes 256 levels per channel: convert the images to 8 bits"
                )


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
        return e.strerror if isinstance(e, OSError) and e.strerror else first_line(e)  # strerror: no path
    return None


def _first_bad(bad: dict[Path, str], root: Path, n: int = 3) -> str:
    """The first n bad files, relative to root, with why each failed."""
    shown = [f"{p.relative_to(root)} ({why})" for p, why in list(bad.items())[:n]]
    return ", ".join(shown + (["..."] if len(bad) > n else []))


def folder_dataset(data: Any, labels: bool = False) -> FolderDataset:
    return FolderDataset(
        data.root, data.image_size, data.channels, data.bad_images, data.background, labels=labels
    )
