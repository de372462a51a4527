"""The data order: which images, flipped or not, make the batch of each optimizer step.

It is a pure function of (seed, step). Epoch e is a permutation drawn from a generator seeded with
(seed, e), and step s (0-based) reads batch s mod B of epoch s div B, where B is the number of full batches
in an epoch. So a resumed run reads exactly the batches an uninterrupted one would have read, whatever the
number of DataLoader workers: the workers only load images, every random choice is made here.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Sampler


class DataOrder:
    def __init__(self, n_images: int, batch_size: int, seed: int, hflip: bool) -> None:
        if n_images < batch_size:
            raise ValueError(f"{n_images} images cannot fill a batch of {batch_size}")
        self.n_images, self.batch_size, self.seed, self.hflip = n_images, batch_size, seed, hflip
        self.per_epoch = n_images // batch_size  # the last, partial batch of an epoch is dropped

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of 0-based step ``step``."""
        return divmod(step, self.per_epoch)

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The image indices (per_epoch, batch_size) of an epoch and which of them are flipped."""
        rng = np.random.default_rng([self.seed, epoch])
        used = self.per_epoch * self.batch_size
        index = rng.permutation(self.n_images)[:used].reshape(self.per_epoch, self.batch_size)
        flips = rng.random(used).reshape(self.per_epoch, self.batch_size) < 0.5
        return torch.from_numpy(index), torch.from_numpy(flips & self.hflip)

    def steps(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, flips) for step ``start`` (0-based) and every step after it, endlessly."""
        epoch, batch = self.position(start)
        while True:
            index, flips = self.epoch(epoch)
            for b in range(batch, self.per_epoch):
                yield index[b], flips[b]
            epoch, batch = epoch + 1, 0


def shard(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """Rank ``rank``'s contiguous slice of a step's global batch (of indices, flips or images)."""
    per_rank = batch.shape[0] // world_size
    return batch[rank * per_rank : (rank + 1) * per_rank]


class BatchSampler(Sampler[list[int]]):
    """The image indices of each step from ``start`` on, as a DataLoader ``batch_sampler``: rank ``rank``
    of ``world_size`` loads its contiguous slice of every global batch, so the images of a step do not
    depend on the number of ranks."""

    def __init__(self, order: DataOrder, start: int, rank: int = 0, world_size: int = 1) -> None:
        self.order, self.start, self.rank, self.world_size = order, start, rank, world_size

    def __iter__(self) -> Iterator[list[int]]:
        for index, _ in self.order.steps(self.start):
            yield shard(index, self.rank, self.world_size).tolist()


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror the images of x (N, C, H, W) where ``flips`` (N,) is true.

    Flips on the CPU that mark nothing return x itself (reading them costs no device sync); flips already
    on the device are never read back, so a step that takes them waits for nothing."""
    if flips.device.type == "cpu" and not bool(flips.any()):
        return x
    return torch.where(flips.to(x.device, non_blocking=True)[:, None, None, None], x.flip(-1), x)
