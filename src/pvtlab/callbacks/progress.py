"""What a run shows while it trains: a progress bar with the training loss and a few of its
terms, read back without waiting for the GPU at every batch, or, without a bar (a SLURM job's
output file), one line of step, loss, learning rate and speed every few steps."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback, RichProgressBar
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

__all__ = ["CompileReport", "PeriodicLossProgressBar", "StepLog", "shown_losses"]

log = logging.getLogger(__name__)

# A loss term of an auxiliary decoder layer (DETR's `loss_ce_0` ... `loss_giou_4`).
AUXILIARY_TERM = re.compile(r".*_\d+$")
LOGGED_ON_STEP_AND_EPOCH = re.compile(r"_(step|epoch)$")


def shown_losses(
    logged: Mapping[str, Any], prefix: str = "train/loss", max_terms: int = 3
) -> dict[str, float]:
    """The total loss `prefix` and at most `max_terms` of its named terms (`prefix_<name>`,
    the auxiliary layers' copies left out), as numbers, in the order they were logged. A value
    logged on step and epoch shows as its ``_step`` and ``_epoch`` entries, as in Lightning's
    bar."""
    shown: dict[str, float] = {}
    terms: set[str] = set()
    for name, value in logged.items():
        if not name.startswith(prefix) or f"{name}_step" in logged:
            continue
        if not isinstance(value, Tensor) or value.numel() != 1:
            continue
        term = LOGGED_ON_STEP_AND_EPOCH.sub("", name)
        if term != prefix and term not in terms:
            if AUXILIARY_TERM.match(term) or len(terms) == max_terms:
                continue
            terms.add(term)
        shown[name] = float(value)
    return shown


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
    It shows the total and at most `max_terms` of its terms (`shown_losses`): DETR logs 19.
    """

    def __init__(
        self,
        every_n_steps: int | None = None,
        prefix: str = "train/loss",
        max_terms: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if every_n_steps is not None and every_n_steps < 1:
            raise ValueError(
                "every_n_steps must be a whole number >= 1 or null (trainer.log_every_n_steps), "
                f"got {every_n_steps!r}"
            )
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.max_terms = max_terms
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
        return shown_losses(trainer.callback_metrics, self.prefix, self.max_terms)


class StepLog(Callback):
    """Without a progress bar (``trainer.enable_progress_bar=false``), one log line every
    `trainer.log_every_n_steps` optimizer steps: step, loss and its key terms, learning rate and
    speed, so a batch job's output file shows the run moving."""

    def __init__(self, prefix: str = "train/loss", max_terms: int = 3) -> None:
        self.prefix = prefix
        self.max_terms = max_terms
        self._since: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._since = (time.perf_counter(), trainer.global_step)

    @rank_zero_only
    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        step = trainer.global_step
        every = max(trainer.log_every_n_steps, 1)
        if self._since is None or step == self._since[1] or step % every:
            return
        started, first = self._since
        now = time.perf_counter()
        self._since = (now, step)
        losses = shown_losses(trainer.callback_metrics, self.prefix, self.max_terms)
        parts = [f"step {step}" + (f"/{trainer.max_steps}" if trainer.max_steps > 0 else "")]
        parts += [f"{name.removeprefix('train/')} {value:.4g}" for name, value in losses.items()]
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.3g}")
        parts.append(f"{(step - first) / max(now - started, 1e-9):.2f} steps/s")
        log.info("epoch %d, %s", trainer.current_epoch, ", ".join(parts))


class CompileReport(Callback):
    """With ``compile=true``: says that the first batch compiles the model, then how long that
    batch took, compilation included (torch.compile compiles at the first call, not when asked).
    """

    def __init__(self) -> None:
        self._started: float | None = None
        self._done = False

    @rank_zero_only
    def _start(self, trainer: L.Trainer) -> None:
        if self._started is None and not self._done:
            log.info("compile=true: compiling the model at its first batch (this can take minutes)")
            self._started = time.perf_counter()

    @rank_zero_only
    def _end(self, trainer: L.Trainer) -> None:
        if self._started is not None and not self._done:
            self._done = True
            log.info(
                "compile=true: the first batch, compilation included, took %.1f s",
                time.perf_counter() - self._started,
            )

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._end(trainer)

    def on_validation_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(trainer)

    def on_validation_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._end(trainer)

    def on_test_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._start(trainer)

    def on_test_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._end(trainer)
