"""Checkpoint files that survive a kill: atomic writes, a `last.ckpt` every N steps, and one on
Ctrl-C / SIGTERM before the run stops."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
import uuid
from pathlib import Path
from types import FrameType
from typing import Any

import lightning as L
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_only

from pvtlab.config import ConfigError
from pvtlab.runs import resume_command

log = logging.getLogger(__name__)

# OSError numbers of a write that found no room.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class CheckpointWriteError(ConfigError):
    """A checkpoint that could not be written for want of disk space (a user error: the run
    stops with one message naming the file and the free space; the previous file is kept)."""


class TrainingInterruptedError(RuntimeError):
    """Training stopped on Ctrl-C or SIGTERM after its last checkpoint was written; the message
    holds the command that resumes it."""


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
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if _out_of_space(error):
            raise CheckpointWriteError(_out_of_space_message(path)) from error
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    descriptor = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _out_of_space(error: BaseException) -> bool:
    """An OSError of a full disk or quota, or torch's writer failing to write (it reports a
    failed write as a RuntimeError, "PytorchStreamWriter failed writing file ...")."""
    if isinstance(error, OSError):
        return error.errno in NO_SPACE
    return isinstance(error, RuntimeError) and "failed writing" in str(error)


def _out_of_space_message(path: Path) -> str:
    try:
        free = f"{shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    kept = f"the previous {path.name} is kept" if path.exists() else f"no {path.name} was written"
    return (
        f"cannot write checkpoint {path}: the disk is full ({free} on {path.parent}); {kept} "
        "and no partial file is left. Free space there, or write runs to another disk "
        "(paths.log_dir=...)."
    )


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


class SignalCheckpoint(Callback):
    """On Ctrl-C or SIGTERM (SLURM's pre-emption), finish the current step, write
    `<dirpath>/last.ckpt` and stop, naming the command that resumes the run.

    SIGTERM is Lightning's: its signal connector records it (`trainer.received_sigterm`) and
    would end the fit with `SIGTERMException` after the step; this callback writes the checkpoint
    first, at the end of the same step, where `StepCheckpoint` writes its own (so the resume is
    exact). Ctrl-C is caught here for the fit: the first one asks for the same stop, a second one
    raises KeyboardInterrupt at once (Lightning's own shutdown). Under DDP the stop is decided
    together (any process asked), so every process saves and stops at the same step. The
    checkpoint goes through the trainer's checkpoint IO, atomic for local files.
    """

    def __init__(self, dirpath: _PATH) -> None:
        self.dirpath = Path(dirpath)
        self._interrupted = False
        self._previous_handler: Any = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning's signal connector has saved the process's handlers (it restores them
        # when the fit ends), so this one is never taken for the process's own.
        self._interrupted = False
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread
            self._previous_handler = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        if self._interrupted:
            self._restore()
            raise KeyboardInterrupt
        self._interrupted = True
        if rank_zero_only.rank == 0:  # os.write: safe inside a signal handler, unlike logging
            os.write(
                2,
                b"\nCtrl-C: stopping after this step, writing last.ckpt (Ctrl-C again "
                b"aborts without saving)\n",
            )

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any
    ) -> None:
        stop = self._interrupted or trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self._restore()
        reason = "SIGTERM" if trainer.received_sigterm else "Ctrl-C"
        raise TrainingInterruptedError(
            f"{reason}: training stopped at step {trainer.global_step} (epoch "
            f"{trainer.current_epoch}); {path} holds it. Resume with:\n  "
            f"{resume_command(self.dirpath.parent)}"
        )

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore()
        # SIGTERM outside a training step (validation): Lightning stops the fit itself.
        last = self.dirpath / "last.ckpt"
        interrupted_here = isinstance(exception, TrainingInterruptedError)
        if trainer.received_sigterm and not interrupted_here and last.is_file():
            log.warning(
                "SIGTERM: stopped; resume from %s with:\n  %s",
                last,
                resume_command(self.dirpath.parent),
            )

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None
