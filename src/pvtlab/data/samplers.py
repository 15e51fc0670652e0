"""Repeated augmentation (DeiT): each image appears `num_repeats` times per epoch, the copies on
different processes, so each process still sees about ``len(dataset) / world_size`` samples.

A `DistributedSampler` subclass on purpose: Lightning keeps a sampler of that type as it is
under DDP instead of wrapping it in a second distributed sampler.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


class RepeatAugSampler(DistributedSampler):
    """Shuffle, repeat every index `num_repeats` times, deal the result out to the replicas.

    Args:
        dataset: anything with a length.
        num_replicas, rank: the process group's size and this process's rank (default: read from
            torch.distributed when initialised, else 1 and 0).
        shuffle: draw a new permutation each epoch (`set_epoch`), from `seed` + epoch.
        num_repeats: copies of each index per epoch (3 in DeiT and PVT).
        seed: base seed, identical on every process.

    Each epoch yields ``ceil(len(dataset) / num_replicas)`` indices per process: the same epoch
    length as without repetition, so schedules in epochs keep their meaning. The copies of one
    image are consecutive in the repeated list, hence dealt to consecutive ranks.
    """

    def __init__(
        self,
        dataset: Sized,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
        num_repeats: int = 3,
        seed: int = 0,
    ) -> None:
        initialised = dist.is_available() and dist.is_initialized()
        if num_replicas is None:
            num_replicas = dist.get_world_size() if initialised else 1
        if rank is None:
            rank = dist.get_rank() if initialised else 0
        if num_repeats < 1:
            raise ValueError(f"num_repeats={num_repeats} must be >= 1")
        super().__init__(dataset, num_replicas, rank, shuffle=shuffle, seed=seed)
        self.num_repeats = int(num_repeats)
        self.num_samples = math.ceil(len(dataset) / self.num_replicas)
        # Enough repeated indices that every rank can take num_samples of them.
        per_rank = math.ceil(len(dataset) * self.num_repeats / self.num_replicas)
        self.total_size = per_rank * self.num_replicas

    def __iter__(self) -> Iterator[int]:
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        repeated = order.repeat_interleave(self.num_repeats)
        padding = self.total_size - len(repeated)
        if padding > 0:
            repeated = torch.cat([repeated, repeated[:padding]])
        mine = repeated[self.rank : self.total_size : self.num_replicas][: self.num_samples]
        return iter(mine.tolist())

    def __len__(self) -> int:
        return self.num_samples
