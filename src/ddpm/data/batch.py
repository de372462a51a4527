"""The batch every path carries: images and their optional conditioning (class labels), from a data set's
items through either batch path, each rank's slice and the training step to the network's call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch.utils import _pytree

# One item of a data set: an image (C, H, W) in [-1, 1], and its class index where the set has labels.
Item = tuple[torch.Tensor, int | None]


@dataclass(frozen=True)
class Batch:
    images: torch.Tensor  # (B, C, H, W) in [-1, 1]
    labels: torch.Tensor | None = None  # (B,) class indices, where the set has them

    @property
    def size(self) -> int:
        return self.images.shape[0]

    @classmethod
    def collate(cls, items: Sequence[Item]) -> Batch:
        """A DataLoader's collate_fn: the items' images stacked, and their labels where every item has one."""
        labels = [label for _, label in items]
        has_labels = all(label is not None for label in labels)
        return cls(
            torch.stack([image for image, _ in items]),
            torch.tensor(labels, dtype=torch.long) if has_labels and labels else None,
        )

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        return _pytree.tree_map(lambda x: x.to(device, non_blocking=non_blocking), self)

    def shard(self, rank: int, world_size: int) -> Batch:
        """Rank ``rank``'s contiguous slice of a step's global batch."""
        per_rank = self.size // world_size
        return _pytree.tree_map(lambda x: x[rank * per_rank : (rank + 1) * per_rank], self)

    def chunk(self, n: int) -> list[Batch]:
        """``n`` micro-batches in order (as Tensor.chunk splits)."""
        images = self.images.chunk(n)
        labels = self.labels.chunk(n) if self.labels is not None else [None] * len(images)
        return [Batch(x, y) for x, y in zip(images, labels, strict=True)]


# A pytree node, so that tree_map (devices, shards, a captured step's static buffers) sees its tensors.
_pytree.register_dataclass(Batch)
