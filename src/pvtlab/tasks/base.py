"""What every pvtlab task shares: the wrapped model, its description, optimizer and schedule."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, ClassVar

import lightning as L
import torch
import torch._inductor.config as inductor_config
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from torch import nn

from pvtlab.models.heads import static_shape_parts
from pvtlab.tasks.optim import ScheduleSpec, build_optimizer, build_scheduler

# Inductor settings for a model whose weights no longer change (evaluation, never training):
# the weights become constants ("freezing"), prepacked for oneDNN, whose linear layers then run
# bias and GELU in their epilogue and, under bf16 autocast, no longer cast the weights per call.
FROZEN_WEIGHTS: dict[str, Any] = {"freezing": True}


@contextmanager
def frozen_weight_compilation() -> Iterator[None]:
    """Call a model compiled with `options=FROZEN_WEIGHTS` inside this block. Dynamo reads the
    setting when it traces, at the first call, so the option alone does not freeze; the option
    gives the compiled code a backend of its own, so that a graph traced without freezing (a
    training compile of the same module class) is never reused here, nor this one there."""
    with inductor_config.patch(FROZEN_WEIGHTS):
        yield


class TaskModule(L.LightningModule):
    """Base LightningModule: owns `model`, builds the optimizer and a per-step schedule.

    Args:
        model: the network (backbone + head) built by `pvtlab.pipeline.build_model`.
        model_config: plain description of `model` (backbone, head, num_classes), saved in the
            checkpoint so that `pvtlab.pipeline.load_task` can rebuild it without the run's config.
            `pvtlab.pipeline.build_task` adds the run's task and data groups to the saved
            hyperparameters (`pvtlab.run_config`), what `src/eval.py` evaluates with.
        optimizer: keyword arguments of `pvtlab.tasks.optim.build_optimizer`.
        scheduler: fields of `pvtlab.tasks.optim.ScheduleSpec`.

    Each task names its kind of prediction and the validation metric that chooses its best
    checkpoint (`monitor`, higher or lower is better by `monitor_mode`).
    """

    kind: ClassVar[str]
    monitor: ClassVar[str]
    monitor_mode: ClassVar[str] = "max"

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        # Plain values only: checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(ignore=["model"])

    def lr_scale(self) -> float:
        """Factor on `optimizer.lr` for this run (1: none); a task with a batch-size rule
        overrides it. Applied before the schedule is built, so the schedule's absolute values
        (a warm-up start, a floor) hold from the first step."""
        return 1.0

    def configure_optimizers(self) -> dict[str, Any]:
        # First: it sets up the training loader, whose batch size `lr_scale` may read.
        total_steps = int(self.trainer.estimated_stepping_batches)
        arguments = dict(self.hparams.optimizer or {})
        scale = self.lr_scale()
        if scale != 1.0:
            arguments["lr"] = arguments["lr"] * scale
        if self.trainer.gradient_clip_val and scales_the_loss(self.trainer):
            # A fused optimizer unscales fp16's gradients inside step(), after the clipping
            # would have run, so Lightning refuses that pair; the multi-tensor path clips as usual.
            arguments["fused"] = False
        optimizer = build_optimizer(self.model, **arguments)
        spec = ScheduleSpec(**_tuples(self.hparams.scheduler or {}))
        max_epochs = self.trainer.max_epochs if self.trainer.max_epochs not in (None, -1) else None
        steps_per_epoch = total_steps / max_epochs if max_epochs else float(total_steps)
        scheduler = build_scheduler(optimizer, spec, total_steps, steps_per_epoch)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1},
        }

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Clip as Lightning does, also for a fused optimizer under bf16 autocast.

        Lightning refuses any fused optimizer under mixed precision, for fp16's sake (see
        `configure_optimizers`). bf16 scales nothing, so its gradients are final after the
        backward and clip as in fp32, which keeps the fused step for DETR's bf16 recipe."""
        plugin = self.trainer.precision_plugin
        if isinstance(plugin, MixedPrecision) and not scales_the_loss(self.trainer):
            Precision.clip_gradients(
                plugin, optimizer, gradient_clip_val or 0.0, gradient_clip_algorithm or "norm"
            )
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def compile_model(self, **kwargs: Any) -> None:
        """`torch.compile` the network's static-shape parts in place (`static_shape_parts`:
        the whole classifier or segmenter; a detector's backbone, FPN and dense branches).
        Parameter names, hence checkpoints, are unchanged."""
        for part in static_shape_parts(self.model):
            part.compile(**kwargs)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def scales_the_loss(trainer: L.Trainer) -> bool:
    """Whether a trainer's precision scales the loss (fp16's gradient scaler): its gradients
    are unscaled only in the optimizer step, after gradient clipping would run."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None


def backbone_of(model: nn.Module) -> nn.Module:
    """The timm backbone inside a network: the first module that describes its features."""
    for module in model.modules():
        if hasattr(module, "feature_info"):
            return module
    raise TypeError(f"{type(model).__name__} holds no timm backbone (no module has feature_info)")


def _tuples(values: Mapping[str, Any]) -> dict[str, Any]:
    """Config lists become tuples so that frozen dataclasses hash and compare."""
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in values.items()}
