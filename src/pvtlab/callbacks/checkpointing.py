"""Checkpoint files that survive a kill: atomic writes, and a `last.ckpt` every N steps."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """`torch.save` to a temporary file beside `path`, fsync'd, then renamed over `path`.

    A process killed at any moment leaves either the old file or the new one, never a torn one;
    at worst a `.<name>.tmp-*` file remains, which nothing reads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with tmp.open("wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with local files written by `atomic_torch_save`.

    Remote paths (s3://, gs://, ...) keep Lightning's own transactional writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got "
                f"{storage_options!r}"
            )
        if not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)


class StepCheckpoint(ModelCheckpoint):
    """Writes `<dirpath>/last.ckpt` every `every_n_train_steps` optimizer steps (0: never).

    Beside the epoch-end `ModelCheckpoint`, which writes the same `last.ckpt`, so that a run killed
    mid-epoch loses at most N steps (`ckpt_path=last` resumes it).
    """

    def __init__(self, dirpath: _PATH, every_n_train_steps: int = 0) -> None:
        super().__init__(
            dirpath=dirpath,
            save_top_k=0,
            save_last=True,
            every_n_train_steps=int(every_n_train_steps),
            every_n_epochs=0,
            enable_version_counter=False,
        )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The epoch-end checkpoint callback writes the final `last.ckpt`."""
