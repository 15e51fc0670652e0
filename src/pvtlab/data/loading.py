"""Loader settings shared by every DataModule: the `loader:` group of every data config, and its
defaults resolved in one place.

`LoaderConfig` holds what a config says (batch sizes, workers, pinning); `LoaderSettings` is what
a DataLoader is then built with on this node. Defaults: one worker per usable core but one (the
main process trains), at most 8, the cores shared among the training processes of a node (DDP /
FSDP: one per device); workers kept between epochs; two batches prefetched per worker; pinned
host memory only where a CUDA device will read it (pinning without one only costs time and warns).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["LoaderConfig", "LoaderSettings", "default_num_workers", "processes_on_this_node"]


@dataclass(frozen=True)
class LoaderConfig:
    """How a DataModule batches and loads: the `loader:` group of every data config.

    Args:
        batch_size: training samples per process (one process per device).
        eval_batch_size: samples per process for validation and test (None: `batch_size`).
        num_workers: loader workers per process (None: this node's cores shared out, see
            `default_num_workers`).
        pin_memory: page-locked host batches (None: when CUDA is available).
        persistent_workers: keep the workers between epochs (false for exact augmentation
            streams after a resume).
        prefetch_factor: batches each worker loads ahead.
    """

    batch_size: int = 2
    eval_batch_size: int | None = None
    num_workers: int | None = None
    pin_memory: bool | None = None
    persistent_workers: bool = True
    prefetch_factor: int | None = 2

    def __post_init__(self) -> None:
        for name in ("batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"data.loader.{name}={value} must be >= 1")

    def settings(self) -> LoaderSettings:
        """The DataLoader keyword arguments these values resolve to in one process."""
        return LoaderSettings.resolve(
            self.num_workers, self.pin_memory, self.persistent_workers, self.prefetch_factor
        )


def default_num_workers(processes: int = 1) -> int:
    """Workers of one of `processes` training processes sharing this node's usable cores: its
    share of them but one (the process itself trains), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // max(1, processes) - 1))


def processes_on_this_node(trainer: Any | None) -> int:
    """Training processes sharing this node: the attached Trainer's devices (one process each
    under DDP and FSDP), else torchrun's LOCAL_WORLD_SIZE, else 1."""
    if trainer is not None:
        return max(1, int(trainer.num_devices))
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


@dataclass(frozen=True)
class LoaderSettings:
    """The keyword arguments every loader of a DataModule shares."""

    num_workers: int
    pin_memory: bool
    persistent_workers: bool
    prefetch_factor: int | None
    # num_workers was the default (null): `for_processes` shares the node's cores out again.
    automatic_workers: bool = field(default=False, repr=False)

    @classmethod
    def resolve(
        cls,
        num_workers: int | None = None,
        pin_memory: bool | None = None,
        persistent_workers: bool = True,
        prefetch_factor: int | None = 2,
        processes: int = 1,
    ) -> LoaderSettings:
        """Settings from a data config's values for one of `processes` training processes on
        this node; None picks the default described above."""
        workers = default_num_workers(processes) if num_workers is None else int(num_workers)
        if workers < 0:
            raise ValueError(
                f"data.loader.num_workers={num_workers} must be >= 0 (or null: automatic)"
            )
        return cls(
            num_workers=workers,
            pin_memory=(pin_memory is None or bool(pin_memory)) and torch.cuda.is_available(),
            persistent_workers=bool(persistent_workers) and workers > 0,
            prefetch_factor=prefetch_factor if workers > 0 else None,
            automatic_workers=num_workers is None,
        )

    def for_processes(self, processes: int) -> LoaderSettings:
        """These settings in one of `processes` training processes on this node: a default
        worker count becomes that process's share of the cores; a set one stays."""
        if not self.automatic_workers or processes <= 1:
            return self
        return LoaderSettings.resolve(
            None, self.pin_memory, self.persistent_workers, self.prefetch_factor, processes
        )

    def kwargs(self) -> dict[str, Any]:
        """`DataLoader(**settings.kwargs())`."""
        settings = asdict(self)
        del settings["automatic_workers"]
        return settings
