"""DataLoader settings shared by every DataModule: one set of defaults, resolved in one place.

Defaults: one worker per usable core but one (the main process trains), at most 8; workers kept
between epochs; two batches prefetched per worker; pinned host memory only where a CUDA device
will read it (pinning without one only costs time and warns).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

__all__ = ["LoaderSettings", "default_num_workers"]


def default_num_workers() -> int:
    """One worker less than the usable cores (the main process trains), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


@dataclass(frozen=True)
class LoaderSettings:
    """The keyword arguments every loader of a DataModule shares."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None

    @classmethod
    def resolve(
        cls,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
    ) -> LoaderSettings:
        """Settings from a data config's values; None picks the default described above."""
        workers = default_num_workers() if num_workers is None else int(num_workers)
        if workers < 0:
            raise ValueError(f"data.num_workers={num_workers} must be >= 0 (or null: automatic)")
        return cls(
            num_workers=workers,
            pin_memory=(pin_memory is None or bool(pin_memory)) and torch.cuda.is_available(),
            persistent_workers=bool(persistent_workers) and workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
        )

    def kwargs(self) -> dict[str, Any]:
        """`DataLoader(**settings.kwargs())`."""
        return asdict(self)
