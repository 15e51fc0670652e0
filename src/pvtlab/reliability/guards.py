"""Stop a run at its first non-finite loss, before that step touches the weights or a checkpoint."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from pvtlab.utils.numerics import scales_the_loss


class NonFiniteLossError(FloatingPointError):
    """A training loss that is NaN or infinite."""


def skips_on_found_inf(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer.step()` leaves weights and state untouched when its `found_inf`
    attribute holds 1.0: the fused AdamW, Adam and SGD kernels read it on the device (the flag
    `torch.amp.GradScaler` sets), after the closure's backward has run.

    Not before the first step: a skipped first step would leave fused SGD's momentum buffers
    allocated but never written."""
    fused = all(group.get("fused") for group in optimizer.param_groups)
    return fused and bool(optimizer.state)


@dataclass
class _PendingCheck:
    """One step's finiteness on its way to the host, and what the error message would name."""

    finite: Tensor  # a host copy (pinned on CUDA), valid once `arrived` is recorded as done
    arrived: torch.cuda.Event | None
    loss: Tensor
    logged: Mapping[str, Tensor]
    step: int
    epoch: int
    batch: int
    skipped_on_device: bool

    def ready(self) -> bool:
        return self.arrived is None or self.arrived.query()

    def wait(self) -> None:
        if self.arrived is not None:
            self.arrived.synchronize()


class NonFiniteLossGuard(Callback):
    """Raises `NonFiniteLossError` naming the step and the losses when the loss is not finite.

    The weights and optimizer state stay those of the last good step and no checkpoint is
    written after the bad one, so the run's `last.ckpt` stays the last good one. Under DDP the
    decision is shared, so every process stops at the same step.

    Where every optimizer skips its update on a device flag (`skips_on_found_inf`: the fused
    optimizers, pvtlab's default), the guard never makes the step wait for the accelerator: the
    flag is set from the loss on the device, the bad step skips itself, and the host reads a
    copy of the flag once the copy has arrived (a step or so later on a GPU, at once on the
    CPU), and always before a checkpoint is written or the fit ends. Otherwise (the foreach
    optimizers, fp16's gradient scaler, the first step) it reads the loss before the backward.
    """

    def __init__(self) -> None:
        self._pending: deque[_PendingCheck] = deque()
        self._found_inf: Tensor | None = None  # over the micro-batches of one optimizer step
        self._hooks: list[RemovableHandle] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hooks = [
            optimizer.register_step_post_hook(self._after_optimizer_step)
            for optimizer in trainer.optimizers
        ]

    def on_before_backward(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: Tensor
    ) -> None:
        finite = torch.isfinite(loss.detach()).all()
        if not self._skips_on_device(trainer):
            self._check_now(trainer, loss, finite)
            return
        bad = (~finite).float()
        if trainer.world_size > 1 and dist.is_initialized():
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # queued on the device, not waited on
        self._found_inf = bad if self._found_inf is None else torch.maximum(self._found_inf, bad)
        for optimizer in trainer.optimizers:
            optimizer.found_inf = self._found_inf  # read by step() once the closure returns
        self._pending.append(self._send_to_host(trainer, loss, bad == 0))

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        self._check_arrived(trainer, wait=False)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self._check_arrived(trainer, wait=False)

    def on_save_checkpoint(self, trainer: L.Trainer, *args: Any) -> None:
        self._check_arrived(trainer, wait=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._check_arrived(trainer, wait=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        for hook in self._hooks:
            hook.remove()
        for optimizer in trainer.optimizers:  # a fit stopped between backward and step
            self._after_optimizer_step(optimizer)
        self._hooks = []
        self._pending.clear()

    def _skips_on_device(self, trainer: L.Trainer) -> bool:
        optimizers = trainer.optimizers
        if scales_the_loss(trainer) or not optimizers:  # a scaler sets found_inf itself
            return False
        return all(map(skips_on_found_inf, optimizers))

    def _after_optimizer_step(self, optimizer: torch.optim.Optimizer, *args: Any) -> None:
        self._found_inf = None
        if hasattr(optimizer, "found_inf"):
            del optimizer.found_inf

    def _check_now(self, trainer: L.Trainer, loss: Tensor, finite_on_device: Tensor) -> None:
        finite = bool(finite_on_device)
        if trainer.world_size > 1:
            finite = trainer.strategy.reduce_boolean_decision(finite, all=True)
        if not finite:
            check = self._describe(trainer, loss, finite_on_device, arrived=None, skipped=False)
            raise NonFiniteLossError(self.message(check, self._last_checkpoint(trainer)))

    def _send_to_host(self, trainer: L.Trainer, loss: Tensor, finite: Tensor) -> _PendingCheck:
        if finite.device.type != "cuda":
            return self._describe(trainer, loss, finite, arrived=None, skipped=True)
        host = torch.empty((), dtype=torch.bool, pin_memory=True)
        host.copy_(finite, non_blocking=True)
        arrived = torch.cuda.Event()
        arrived.record()
        return self._describe(trainer, loss, host, arrived, skipped=True)

    @staticmethod
    def _describe(
        trainer: L.Trainer,
        loss: Tensor,
        finite: Tensor,
        arrived: torch.cuda.Event | None,
        skipped: bool,
    ) -> _PendingCheck:
        # This step's logged values (Lightning internals): kept as tensors, read only to report.
        logged = {}
        for key, result in (trainer._results or {}).items():
            name = key.split(".", 1)[-1]
            value = getattr(result, "_forward_cache", None)
            if name.startswith("train/") and isinstance(value, Tensor) and value.numel() == 1:
                logged[name] = value.detach()
        return _PendingCheck(
            finite=finite,
            arrived=arrived,
            loss=loss.detach(),
            logged=logged,
            step=trainer.global_step,
            epoch=trainer.current_epoch,
            batch=trainer.fit_loop.epoch_loop.batch_idx + 1,
            skipped_on_device=skipped,
        )

    def _check_arrived(self, trainer: L.Trainer, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].ready()):
            check = self._pending.popleft()
            check.wait()
            if not bool(check.finite):
                self._pending.clear()
                raise NonFiniteLossError(self.message(check, self._last_checkpoint(trainer)))

    @staticmethod
    def _last_checkpoint(trainer: L.Trainer) -> str:
        callback = trainer.checkpoint_callback
        return getattr(callback, "last_model_path", "") if callback is not None else ""

    @staticmethod
    def message(check: _PendingCheck, last_checkpoint: str) -> str:
        bad = sorted(
            f"{name}={float(value)}"
            for name, value in check.logged.items()
            if not math.isfinite(float(value))
        )
        kept = (
            "The optimizer skipped that step, so the weights are those of the last good step"
            if check.skipped_on_device
            else "The weights are those of the last good step"
        )
        loss = float(check.loss.float().mean())
        where = f"at step {check.step} (epoch {check.epoch}, batch {check.batch})"
        if math.isfinite(loss):  # under DDP: the decision was shared with the process whose wasn't
            found = (
                f"non-finite training loss on another process {where}; this process's was {loss}"
            )
        else:
            found = f"non-finite training loss {loss} {where}{': ' + ', '.join(bad) if bad else ''}"
        return (
            f"{found}. {kept}; the last checkpoint "
            f"({last_checkpoint or 'none written yet'}) was not overwritten. "
            "Lower the learning rate (task.optimizer.lr), clip gradients "
            "(trainer.gradient_clip_val), or resume with ckpt_path=last."
        )
