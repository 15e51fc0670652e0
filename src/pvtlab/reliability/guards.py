"""Stop a run at its first non-finite loss, before that step touches the weights or a checkpoint."""

from __future__ import annotations

import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor


class NonFiniteLossError(FloatingPointError):
    """A training loss that is NaN or infinite."""


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` naming the step and the losses when the loss is not finite.

    It checks before the backward pass, so the weights and optimizer state stay those of the last
    good step and no checkpoint is written with them: the run's `last.ckpt` stays the last good
    one. Under DDP the decision is shared, so every process stops at the same step.
    """

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if finite:
            return
        raise NonFiniteLossError(self.message(trainer, loss))

    @staticmethod
    def message(trainer: L.Trainer, loss: Tensor) -> str:
        logged = trainer._results or {}  # this step's logged values (Lightning internals)
        bad = []
        for key, result in logged.items():
            name = key.split(".", 1)[-1]
            value = getattr(result, "_forward_cache", None)
            scalar = isinstance(value, Tensor) and value.numel() == 1
            if name.startswith("train/") and scalar and not math.isfinite(float(value)):
                bad.append(f"{name}={float(value)}")
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") if callback is not None else ""
        return (
            f"non-finite training loss {float(loss.detach().float().mean())} at step "
            f"{trainer.global_step} (epoch {trainer.current_epoch}, batch "
            f"{trainer.fit_loop.epoch_loop.batch_idx + 1})"
            f"{': ' + ', '.join(sorted(bad)) if bad else ''}. The weights are those of the last "
            f"good step; the last checkpoint ({last or 'none written yet'}) was not overwritten. "
            "Lower the learning rate (task.optimizer.lr), clip gradients "
            "(trainer.gradient_clip_val), or resume with ckpt_path=last."
        )
