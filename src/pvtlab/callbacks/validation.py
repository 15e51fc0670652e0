"""Validate at the last step of a run that `max_steps` ends between two validations."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

__all__ = ["ValidateAtLastStep"]

log = logging.getLogger(__name__)


class ValidateAtLastStep(Callback):
    """A run that `trainer.max_steps` ends before its next scheduled validation (a 3-step run
    with an epoch of 10 batches, validated once an epoch) validates at its last step, so the
    best checkpoint, `val/*` and `test/*` always have a validation to go by.

    It asks the Trainer to stop at that step: Lightning then validates before stopping, and not
    a second time where a validation was due anyway. One line says when this adds a validation.
    """

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        last = _last_batch_index(trainer)
        if last is None or trainer.check_val_every_n_epoch is None:
            return  # step-interval validation ends on the last step (pipeline.validation_schedule)
        every = trainer.val_check_batch
        at_epoch_end = last + 1 == trainer.num_training_batches
        scheduled = isinstance(every, int) and (last + 1) % every == 0
        if not (at_epoch_end or scheduled) and trainer.is_global_zero:
            log.info(
                "trainer.max_steps=%d ends the run at batch %d of an epoch of %d, before its "
                "next validation: validating at the last step",
                trainer.max_steps,
                last + 1,
                trainer.num_training_batches,
            )

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if 0 < trainer.max_steps <= trainer.global_step:
            trainer.should_stop = True  # Lightning validates a run that is asked to stop


def _last_batch_index(trainer: L.Trainer) -> int | None:
    """The batch index, within its epoch, of the run's last optimizer step; None when
    `max_steps` does not end the run or the epoch length is unknown."""
    batches = trainer.num_training_batches
    if trainer.max_steps <= 0 or not isinstance(batches, int) or batches <= 0:
        return None
    last = trainer.max_steps * trainer.accumulate_grad_batches - 1
    max_epochs = trainer.max_epochs or -1
    if max_epochs > 0 and max_epochs * batches <= last:
        return None  # max_epochs ends the run first, at an epoch's end
    return last % batches
