"""A data set held whole on the training device (``data.on_device``): each step's images are gathered there
by the data order's indices and mirrored by its flips, with no loader, no worker and no host sync.

The images are decoded once, through the set's own transform, and kept as uint8 when every value is one
the transform makes of an 8-bit pixel (checked exactly, so decoding gives the same floats to the bit), as
the float32 the set gives otherwise. A step then reads exactly the images the DataLoader would have."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from ddpm.data.batch import Batch
from ddpm.data.order import DataOrder, apply_flips, shard
from ddpm.data.sets import to_unit_range

# data.on_device=auto holds a folder set on the device only up to this many images: building it decodes
# every file once more (the folder was scanned once already) and the first step waits for it, which on a
# large folder is minutes; data.on_device=true still holds one of any size under the limit.
FOLDER_AUTO_MAX_IMAGES = 50_000
BUILD_BATCH = 256  # images the build decodes at a time


def resident_mb(data: Any, n_images: int) -> float:
    """The set's size on the device in MiB, at one byte a value: every registered set decodes 8-bit
    images, which are held as uint8 (a set that is not on that grid is held as float32, four times it)."""
    return n_images * data.channels * data.image_size**2 / 2**20


def holds_on_device(data: Any, n_images: int) -> bool:
    """Whether the run holds its set on the training device: data.on_device=true / false say so; auto does
    where the set fits under data.on_device_max_mb (and a folder set is small), on a GPU or the CPU alike:
    on the CPU too, the gathered batch costs a fraction of the DataLoader's per-image transforms. A set too
    large for true was refused by validate.check_data_fits before any work."""
    if isinstance(data.on_device, bool):
        return data.on_device
    small = data.name != "folder" or n_images <= FOLDER_AUTO_MAX_IMAGES
    return small and resident_mb(data, n_images) <= data.on_device_max_mb


def data_path(data: Any, n_images: int, device: torch.device) -> str:
    """How the run reads its images, for its header."""
    if holds_on_device(data, n_images):
        return f"held on {device.type}"
    return f"DataLoader, {data.num_workers} workers"


def unit_table() -> torch.Tensor:
    """(256,) float32: what the sets' transform makes of each 8-bit value."""
    return to_unit_range(1)(torch.arange(256, dtype=torch.uint8).view(1, 1, 256)).view(256)


class ResidentImages:
    """A whole data set as one (N, C, H, W) tensor on the device, uint8 or float32, and its (N,) labels
    where it has them."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        self.images, self.labels = images, labels
        self.table = unit_table().to(images.device)

    @classmethod
    def from_dataset(cls, dataset: Dataset, device: torch.device, num_workers: int = 0) -> ResidentImages:
        """Decode every item of ``dataset`` in order (with ``num_workers`` loader workers) onto ``device``."""
        from ddpm.training.stopping import ignore_stop_signals  # here: data/ does not depend on training/

        loader = DataLoader(
            dataset,
            batch_size=BUILD_BATCH,
            collate_fn=Batch.collate,
            num_workers=num_workers,
            worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(0),  # leaves the global RNG alone, as the run's loader
        )
        table, chunks, labels, exact = unit_table(), [], [], True
        for batch in loader:
            x = batch.images
            labels.append(batch.labels)
            if exact:
                k = encode(x)
                if torch.equal(table[k.long()], x):
                    chunks.append(k)
                    continue
                exact = False  # off the 8-bit grid: everything as float32 (the chunks so far decode exactly)
                chunks = [table[c.long()] for c in chunks]
            chunks.append(x)
        held = torch.cat(labels).to(device) if all(y is not None for y in labels) else None
        return cls(torch.cat(chunks).to(device), held)

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x.long()] if x.dtype == torch.uint8 else x

    def batches(self, order: DataOrder, start: int, rank: int = 0, world_size: int = 1) -> Iterator[Batch]:
        """Rank ``rank``'s batch of steps ``start``, ``start + 1``, ... (0-based), float32 images and their
        labels on the device: what the DataLoader path reads for the same order, without reading back."""
        device = self.images.device
        for index, flips in order.steps(start):
            # indices and flips in one small tensor: one copy a step, from pinned memory on a GPU so that
            # it does not wait for the steps queued before it
            both = torch.stack([shard(index, rank, world_size), shard(flips, rank, world_size).long()])
            if device.type == "cuda":
                both = both.pin_memory()
            both = both.to(device, non_blocking=True)
            images = self.decode(apply_flips(self.images[both[0]], both[1].bool()))
            yield Batch(images, self.labels[both[0]] if self.labels is not None else None)


def encode(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> the nearest 8-bit values (exact where x came from 8-bit pixels)."""
    return ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def resident_for(data: Any, dataset: Dataset, device: torch.device) -> ResidentImages | None:
    """The set held on ``device`` when data.on_device asks for it, else None (the DataLoader reads it)."""
    if not holds_on_device(data, len(dataset)):
        return None
    return ResidentImages.from_dataset(dataset, device, data.num_workers)
