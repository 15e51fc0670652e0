"""Stop a run at its first non-finite loss, before that step touches the weights or a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor

from pvtlab.runs import resume_command

__all__ = ["NonFiniteLossError", "NonFiniteLossGuard"]


class NonFiniteLossError(FloatingPointError):
    """A training loss that is NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` naming the step when a training loss is not finite.

    Each loss is kept, on its device, as it reaches the backward (`on_before_backward`); once
    the backward of an optimizer step is done (`on_before_optimizer_step`), the host reads one
    flag: whether every loss of the step was finite. A bad step stops the fit before the
    optimizer applies it, so the weights and optimizer state stay those of the last good step
    and no checkpoint is written after it: the run's `last.ckpt` stays the last good one. Under
    DDP the flag is reduced over the processes, so every process stops at the same step even
    when only one saw the bad loss.
    """

    def __init__(self) -> None:
        # This optimizer step's losses (one a micro-batch), each with its batch index.
        self._losses: list[tuple[int, Tensor]] = []
        self._batch_idx = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        self._losses.append((self._batch_idx, loss.detach()))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        losses, self._losses = self._losses, []
        finite = all_finite([loss for _, loss in losses])  # the one read of the step
        if trainer.world_size > 1:  # every process reduces, also one without a loss this step
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            raise NonFiniteLossError(self.message(trainer, losses))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._losses = []

    @staticmethod
    def message(trainer: L.Trainer, losses: list[tuple[int, Tensor]]) -> str:
        """What went wrong, where, what was kept, and what to try."""
        bad = [(index, float(loss)) for index, loss in losses if not all_finite([loss])]
        if bad:
            index, value = bad[0]
            found = f"non-finite training loss (train/loss={value})"
        else:  # under DDP: the decision was shared with the process whose loss was not finite
            index = losses[-1][0] if losses else 0
            found = "non-finite training loss on another process"
        where = f"at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {index + 1})"
        last = last_checkpoint(trainer)
        advice = (
            "Lower the learning rate (task.optimizer.lr) or clip gradients "
            "(trainer.gradient_clip_val)"
        )
        if last is None:
            kept = "no checkpoint was written before it, so there is nothing to resume"
            advice += ", and start the run again."
        else:
            kept = f"the last checkpoint ({last}) was not overwritten"
            advice += f", then resume from that checkpoint:\n  {resume_command(last.parent.parent)}"
        return (
            f"{found} {where}. The optimizer did not take that step, so the weights are those "
            f"of the last good step; {kept}. {advice}"
        )


def last_checkpoint(trainer: L.Trainer) -> Path | None:
    """The `last.ckpt` of `trainer`'s checkpoint callbacks, if one exists (written by this
    process or by the run it resumes)."""
    for callback in trainer.checkpoint_callbacks:
        dirpath = getattr(callback, "dirpath", None)
        for path in (getattr(callback, "last_model_path", ""), dirpath and f"{dirpath}/last.ckpt"):
            if path and Path(path).is_file():
                return Path(path)
    return None


def all_finite(losses: list[Tensor]) -> bool:
    """Whether every value of every loss is finite (True for no losses): one read of the host."""
    if not losses:
        return True
    flags = torch.stack([torch.isfinite(loss).all() for loss in losses])
    return bool(flags.all())
