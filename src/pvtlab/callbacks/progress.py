"""A progress bar that shows the training loss without waiting for the GPU at every batch."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import RichProgressBar
from torch import Tensor

__all__ = ["PeriodicLossProgressBar"]


class PeriodicLossProgressBar(RichProgressBar):
    """Lightning's `RichProgressBar`, showing the training losses read back every
    `every_n_steps` batches.

    A value logged with ``prog_bar=True`` is turned into a Python number by Lightning after
    every training batch, and reading a GPU tensor makes the host wait until the step is done:
    a host-device synchronisation a step, which empties the queue of work before the next one.
    So pvtlab's tasks log their training loss without ``prog_bar`` and this bar reads the logged
    values whose names start with `prefix` (``train/loss``, and ``train/loss_step`` /
    ``train/loss_epoch`` where the task logs both) every `every_n_steps` batches (default:
    `trainer.log_every_n_steps`, as often as the logger writes them) and at each epoch's end.
    """

    def __init__(
        self, every_n_steps: int | None = None, prefix: str = "train/loss", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                "every_n_steps must be a whole number >= 1 or null (trainer.log_every_n_steps), "
                f"got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self._losses: dict[str, float] = {}

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        every = self.every_n_steps or max(trainer.log_every_n_steps, 1)
        if self.is_enabled and (not self._losses or (batch_idx + 1) % every == 0):
            self._losses = self._read_losses(trainer)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.is_enabled:  # not on the other processes of a distributed run
            self._losses = self._read_losses(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    def get_metrics(
        self, trainer: L.Trainer, pl_module: L.LightningModule
    ) -> dict[str, int | str | float | dict[str, float]]:
        return {**super().get_metrics(trainer, pl_module), **self._losses}

    def _read_losses(self, trainer: L.Trainer) -> dict[str, float]:
        """The logged losses named `prefix...`, as numbers (one read back each); a value
        logged on step and epoch shows as its ``_step`` and ``_epoch`` entries, as in
        Lightning's bar."""
        logged = trainer.callback_metrics
        return {
            name: float(value)
            for name, value in logged.items()
            if name.startswith(self.prefix)
            and f"{name}_step" not in logged
            and isinstance(value, Tensor)
            and value.numel() == 1
        }
