"""Repeated augmentation: DDP-style splitting over replicas, epochs and repeats."""

from __future__ import annotations

from collections import Counter

import pytest
from torch.utils.data import DistributedSampler

from pvtlab.data.samplers import RepeatAugSampler


def _ranks(n: int, replicas: int, repeats: int = 3, epoch: int = 0) -> list[list[int]]:
    out = []
    for rank in range(replicas):
        sampler = RepeatAugSampler(range(n), num_replicas=replicas, rank=rank, num_repeats=repeats)
        sampler.set_epoch(epoch)
        out.append(list(sampler))
    return out


def test_each_rank_gets_its_share() -> None:
    ranks = _ranks(100, replicas=4)
    assert [len(r) for r in ranks] == [25] * 4
    assert all(0 <= i < 100 for r in ranks for i in r)


def test_copies_of_an_image_go_to_different_ranks() -> None:
    """With as many ranks as repeats, the ranks see the same images, each its own copy."""
    ranks = _ranks(30, replicas=3, repeats=3)
    assert ranks[0] == ranks[1] == ranks[2]
    assert len(set(ranks[0])) == 10  # a third of the data per epoch, each image x3 overall
    counts = Counter(i for r in ranks for i in r)
    assert set(counts.values()) == {3}


def test_eight_ranks_cover_the_data_set() -> None:
    ranks = _ranks(96, replicas=8, repeats=3)
    seen = Counter(i for r in ranks for i in r)
    assert sum(seen.values()) == 96
    # 96 x 3 copies dealt to 8 ranks, each rank keeping 12: 32 distinct images, 3 copies each.
    assert len(seen) == 32 and set(seen.values()) == {3}


def test_epochs_reshuffle_and_are_reproducible() -> None:
    assert _ranks(50, 2, epoch=0) == _ranks(50, 2, epoch=0)
    assert _ranks(50, 2, epoch=0) != _ranks(50, 2, epoch=1)


def test_uneven_sizes_pad() -> None:
    ranks = _ranks(10, replicas=4, repeats=1)
    assert [len(r) for r in ranks] == [3, 3, 3, 3]
    assert set().union(*map(set, ranks)) == set(range(10))


def test_single_process_and_no_shuffle() -> None:
    sampler = RepeatAugSampler(range(6), num_replicas=1, rank=0, num_repeats=2, shuffle=False)
    assert list(sampler) == [0, 0, 1, 1, 2, 2]
    # Outside torch.distributed it defaults to one replica.
    assert RepeatAugSampler(range(6)).num_replicas == 1


def test_lightning_keeps_it_under_ddp() -> None:
    """Lightning re-wraps any sampler that is not a DistributedSampler: this one must be one."""
    assert isinstance(RepeatAugSampler(range(4)), DistributedSampler)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="num_repeats"):
        RepeatAugSampler(range(4), num_repeats=0)
    with pytest.raises(ValueError, match="rank"):
        RepeatAugSampler(range(4), num_replicas=2, rank=2)
