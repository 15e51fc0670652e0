"""Image classification with the DeiT recipe (PVT's ImageNet pre-training, docs/paper.md section 2).

The model is the backbone's own classifier (a timm model, unwrapped), so ``self.model``'s state
dict is exactly what `backbone.pretrained=` reads: `export_backbone` writes it to a file.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.layers import DropPath
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from pvtlab.tasks.base import TaskModule

log = logging.getLogger(__name__)

BACKBONE_FILE = "backbone.pth"
EMA_KEY = "ema_state_dict"


class ClassificationTask(TaskModule):
    """Train and evaluate an image classifier; log top-1 / top-5 accuracy.

    Args:
        model: the classifier (the backbone's timm model with its head sized for the data set).
        model_config: its plain description (saved in checkpoints).
        optimizer: `pvtlab.tasks.optim.build_optimizer` arguments; `lr` is for a global batch of
            `lr_base_batch_size` images and is scaled linearly to the actual global batch.
        scheduler: `pvtlab.tasks.optim.ScheduleSpec` fields (per-step cosine with warm-up).
        lr_base_batch_size: the batch size `optimizer.lr` refers to (DeiT: 512); None: no scaling.
        mixup: `timm.data.Mixup` arguments (mixup_alpha, cutmix_alpha, prob, switch_prob, mode,
            label_smoothing, ...); None or both alphas 0: no Mixup / CutMix.
        label_smoothing: smoothing of the hard-label loss, used when Mixup is off.
        ema: None or {"enabled": bool, "decay": float, ...}: an exponential moving average of
            the weights (timm `ModelEmaV3`, remaining keys are its arguments), validated as
            `val/acc1_ema` and saved under "ema_state_dict" in checkpoints.
        drop_path_warmup_epochs: train without stochastic depth for this many epochs, then at the
            configured rates (the PVT release's remedy for M/L diverging early).
        export_backbone: write the backbone weights (best checkpoint, else final) to
            ``<run>/backbone.pth`` at the end of fitting.
        top_k: the k of the second accuracy (`acc5`); capped at the number of classes.
    """

    kind = "classification"
    monitor = "val/acc1"

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        lr_base_batch_size: int | None = 512,
        mixup: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.1,
        ema: Mapping[str, Any] | None = None,
        drop_path_warmup_epochs: int = 0,
        export_backbone: bool = True,
        top_k: int = 5,
    ) -> None:
        super().__init__(model, model_config, optimizer, scheduler)
        self.num_classes = _num_classes(model, model_config)
        self.mixup = _make_mixup(mixup, self.num_classes)
        self.train_loss = SoftTargetCrossEntropy() if self.mixup else None
        k = min(int(top_k), self.num_classes)
        metrics = MetricCollection(
            {
                "acc1": MulticlassAccuracy(self.num_classes, top_k=1, average="micro"),
                "acc5": MulticlassAccuracy(self.num_classes, top_k=k, average="micro"),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        ema_args = dict(ema or {})
        self.ema_enabled = bool(ema_args.pop("enabled", False))
        self.ema_args = ema_args
        if self.ema_enabled:
            self.val_ema_metrics = metrics.clone(prefix="val/", postfix="_ema")
        # Kept out of the module tree: checkpoints' state_dict stays the model's alone (so it
        # loads with or without EMA configured); the average travels under EMA_KEY instead.
        self._ema: list[ModelEmaV3] = []
        self._pending_ema_state: dict[str, Tensor] | None = None
        self._drop_rates: dict[str, float] = {}
        self.exported_backbone: Path | None = None

    # ---------------------------------------------------------------------------------- steps

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        images, targets = batch
        if self.mixup is not None:
            images, soft = self.mixup(images, targets)
            loss = self.train_loss(self.model(images), soft)
        else:
            loss = F.cross_entropy(
                self.model(images), targets, label_smoothing=self.hparams.label_smoothing
            )
        # Not prog_bar: Lightning would read it back every batch (see PeriodicLossProgressBar).
        self.log("train/loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self._evaluate(self.model(images), targets, self.val_metrics, "val/loss")
        if self._ema:
            self._evaluate(
                self._ema[0].module(images), targets, self.val_ema_metrics, "val/loss_ema"
            )

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        images, targets = batch
        self._evaluate(self.model(images), targets, self.test_metrics, "test/loss")

    def _evaluate(
        self, logits: Tensor, targets: Tensor, metrics: MetricCollection, loss_name: str
    ) -> None:
        loss = F.cross_entropy(logits, targets)
        metrics.update(logits, targets)
        self.log(loss_name, loss, on_epoch=True, sync_dist=True, batch_size=len(targets))
        self.log_dict(metrics, on_epoch=True, prog_bar=loss_name == "val/loss")

    # ------------------------------------------------------------------ optimizer and schedule

    def lr_scale(self) -> float:
        """The linear scaling rule (DeiT): global batch / `lr_base_batch_size`."""
        base = self.hparams.lr_base_batch_size
        if not base:
            return 1.0
        scale = self._batch() / base
        log.info("Learning rate scaled by %.4g for a global batch of %d", scale, self._batch())
        return scale

    def _batch(self) -> int:
        """Global batch size: per-process batch x processes x accumulated batches."""
        trainer = self.trainer
        loader = trainer.train_dataloader
        batch = getattr(loader, "batch_size", None)
        if batch is None:  # a batch sampler instead of batch_size
            batch = getattr(getattr(loader, "batch_sampler", None), "batch_size", 1)
        return int(batch) * trainer.world_size * trainer.accumulate_grad_batches

    # -------------------------------------------------------------------- drop path and EMA

    def on_train_epoch_start(self) -> None:
        warmup = int(self.hparams.drop_path_warmup_epochs)
        if warmup <= 0:
            return
        if not self._drop_rates:
            self._drop_rates = {
                name: float(m.drop_prob)
                for name, m in self.model.named_modules()
                if isinstance(m, DropPath)
            }
        off = self.current_epoch < warmup
        for name, module in self.model.named_modules():
            if name in self._drop_rates:
                module.drop_prob = 0.0 if off else self._drop_rates[name]
        if self.current_epoch in (0, warmup):
            log.info("Drop path %s at epoch %d", "off" if off else "on", self.current_epoch)

    def on_fit_start(self) -> None:
        if self.ema_enabled and not self._ema:
            self._ema.append(ModelEmaV3(self.model, **self.ema_args))
            if self._pending_ema_state is not None:
                self._ema[0].module.load_state_dict(self._pending_ema_state)
                self._pending_ema_state = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._ema:
            self._ema[0].update(self.model, step=self.global_step)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._ema:
            checkpoint[EMA_KEY] = self._ema[0].module.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(EMA_KEY)
        if state is None:
            return
        if self._ema:
            self._ema[0].module.load_state_dict(state)
        else:
            self._pending_ema_state = state

    # ------------------------------------------------------------------------ end of a run

    def on_fit_end(self) -> None:
        if not self.hparams.export_backbone or not self.trainer.is_global_zero:
            return
        callback = self.trainer.checkpoint_callback
        best = getattr(callback, "best_model_path", "") if callback is not None else ""
        target = Path(self.trainer.default_root_dir) / BACKBONE_FILE
        if best:
            self.exported_backbone = export_backbone(best, target)
        else:
            torch.save(self.model.state_dict(), target)
            self.exported_backbone = target

    def summary_rows(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """Top-1 error as the paper reports it (percent), and where the backbone went."""
        rows = {}
        for split in ("val", "test"):
            if f"{split}/acc1" in metrics:
                rows[f"{split} top-1 error (%)"] = f"{100 * (1 - metrics[f'{split}/acc1']):.2f}"
        if self.exported_backbone is not None:
            # Relative to the run folder, printed just below the table (full paths get cut).
            rows["backbone weights"] = f"<run folder>/{self.exported_backbone.name}"
        return rows

    # ------------------------------------------------- display hook (pvtlab.callbacks.predictions)

    def predict_for_display(self, batch: tuple[Tensor, Tensor], limit: int) -> dict[str, Any]:
        """Class probabilities of the first `limit` images of an evaluation batch."""
        images, targets = batch[0][:limit], batch[1][:limit]
        return {
            "kind": "classification",
            "images": images,
            "targets": targets,
            "scores": self.model(images).softmax(dim=-1),
        }


def _num_classes(model: nn.Module, model_config: Mapping[str, Any] | None) -> int:
    if model_config and model_config.get("num_classes"):
        return int(model_config["num_classes"])
    value = getattr(model, "num_classes", None)
    if not value:
        raise ValueError("ClassificationTask needs the number of classes (model_config or model)")
    return int(value)


def _make_mixup(args: Mapping[str, Any] | None, num_classes: int) -> Mixup | None:
    """timm's batch Mixup / CutMix, or None when the config switches both off."""
    args = dict(args or {})
    active = args.get("mixup_alpha", 1.0) > 0 or args.get("cutmix_alpha", 0.0) > 0
    active = active or args.get("cutmix_minmax") is not None
    if not args or not active or args.get("prob", 1.0) <= 0:
        return None
    return Mixup(num_classes=num_classes, **args)


def checkpoint_model_state(
    checkpoint: Mapping[str, Any], ema: bool = False, prefix: str = "model."
) -> dict[str, Tensor]:
    """The classifier's state dict inside a pvtlab checkpoint (keys without `prefix`).

    With `ema`, the exponential moving average saved under "ema_state_dict" instead.
    """
    if ema:
        if EMA_KEY not in checkpoint:
            raise KeyError(f"checkpoint has no {EMA_KEY!r}: it was trained without task.ema")
        return dict(checkpoint[EMA_KEY])
    if "state_dict" not in checkpoint:
        raise KeyError("no 'state_dict' (not a Lightning checkpoint)")
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    if not state:
        raise KeyError(f"no key of the checkpoint's state_dict starts with {prefix!r}")
    return state


def export_backbone(
    ckpt_path: str | Path, out_path: str | Path | None = None, ema: bool = False
) -> Path:
    """Write the classifier weights of a classification checkpoint as a plain state dict.

    The file is what `backbone.pretrained=` reads in every task (``torch.save`` of the timm
    model's ``state_dict()``, as the released pvt_*.pth). Default output: ``backbone.pth``
    beside the checkpoint's run folder (``<run>/checkpoints/x.ckpt`` -> ``<run>/backbone.pth``).
    """
    ckpt_path = Path(ckpt_path)
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    try:
        state = checkpoint_model_state(checkpoint, ema=ema)
    except KeyError as error:
        raise ValueError(f"{ckpt_path}: cannot export a backbone: {error.args[0]}") from error
    if out_path is None:
        run = (
            ckpt_path.parent.parent if ckpt_path.parent.name == "checkpoints" else ckpt_path.parent
        )
        out_path = run / ("backbone_ema.pth" if ema else BACKBONE_FILE)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out_path)
    return out_path
