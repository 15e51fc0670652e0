"""Semantic segmentation task: cross-entropy training, dataset-wide mIoU evaluation.

The network (Semantic FPN, Trans2Seg, ...) maps images to per-class logits at the input size.
Evaluation runs the network on the test-resized image, whole or in sliding windows, optionally at
several scales and flipped (class probabilities averaged), then resizes the scores to each label
map's own size before taking the arg-max, so predictions are scored at the annotation's
resolution. mIoU / aAcc come from one confusion matrix summed over the split (and DDP ranks);
the per-class IoU table is written to the run folder after every evaluation and printed at the
end of `validate` / `test`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console
from torch import Tensor, nn

from pvtlab.evaluation.segmentation import SegmentationMetrics, iou_table, save_iou_csv
from pvtlab.tasks.base import TaskModule


@dataclass(frozen=True)
class InferenceSpec:
    """How evaluation runs the network.

    mode: `whole` (one pass over the test-resized image) or `slide` (windows of `crop_size`
        every `stride` pixels, overlapping logits averaged).
    scales: ratios of the test size to run at (1.0 alone = single scale; the paper's multi-scale
        test uses 0.5, 0.75, 1.0, 1.25, 1.5, 1.75); flip adds horizontally flipped passes.
    """

    mode: str = "whole"
    crop_size: tuple[int, int] = (512, 512)
    stride: tuple[int, int] = (341, 341)
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ("whole", "slide"):
            raise ValueError(
                f"inference.mode={self.mode!r} is not supported; choose one of: whole, slide"
            )
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"inference.scales={list(self.scales)} must be positive ratios")

    @property
    def augmented(self) -> bool:
        return self.flip or tuple(self.scales) != (1.0,)


def slide_windows(
    height: int, width: int, crop: Sequence[int], stride: Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """`(top, left, bottom, right)` of windows covering the image; the last row / column is flush
    with the border, and a side shorter than the crop is covered by one window of that side."""
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    rows = max(height - crop_h + stride[0] - 1, 0) // stride[0] + 1
    cols = max(width - crop_w + stride[1] - 1, 0) // stride[1] + 1
    windows = []
    for r in range(rows):
        top = min(r * stride[0], height - crop_h)
        for c in range(cols):
            left = min(c * stride[1], width - crop_w)
            windows.append((top, left, top + crop_h, left + crop_w))
    return windows


class SegmentationTask(TaskModule):
    """LightningModule for semantic segmentation.

    Args:
        model: images `(B, 3, H, W)` -> logits `(B, K, H, W)`.
        model_config: plain description of `model` (saved in checkpoints).
        optimizer: `pvtlab.tasks.optim.build_optimizer` arguments (paper: AdamW 1e-4, wd 1e-4).
        scheduler: `pvtlab.tasks.optim.ScheduleSpec` fields (paper: poly, power 0.9, per step).
        ignore_index: label value excluded from the loss and the metrics.
        inference: `InferenceSpec` fields (mode, crop_size, stride, scales, flip).
    """

    kind = "segmentation"
    monitor = "val/mIoU"

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        ignore_index: int = 255,
        inference: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(model, model_config, optimizer, scheduler)
        num_classes = (model_config or {}).get("num_classes") or getattr(model, "num_classes", None)
        if num_classes is None:
            raise ValueError(
                "SegmentationTask needs num_classes: in model_config or as model.num_classes"
            )
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.inference_spec = InferenceSpec(
            **{
                k: tuple(v) if isinstance(v, list | tuple) else v
                for k, v in dict(inference or {}).items()
            }
        )
        self.val_metrics = SegmentationMetrics(self.num_classes, ignore_index)
        self.test_metrics = SegmentationMetrics(self.num_classes, ignore_index)

    # ----------------------------------------------------------------------------------- training
    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Cross-entropy averaged over labelled pixels (0 when a batch has none)."""
        total = F.cross_entropy(logits, labels, ignore_index=self.ignore_index, reduction="sum")
        return total / (labels != self.ignore_index).sum().clamp(min=1)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        loss = self.loss(self.model(images), labels)
        # Not prog_bar: Lightning would read it back every batch (see PeriodicLossProgressBar).
        self.log("train/loss", loss, batch_size=images.shape[0])
        return loss

    # ---------------------------------------------------------------------------------- inference
    def slide_logits(self, images: Tensor) -> Tensor:
        """Logits from overlapping windows, averaged where they overlap."""
        spec = self.inference_spec
        B, _, H, W = images.shape
        windows = slide_windows(H, W, spec.crop_size, spec.stride)
        crops = torch.cat([images[:, :, t:b, left:r] for t, left, b, r in windows])
        outputs = self.model(crops).split(B)
        logits = images.new_zeros((B, outputs[0].shape[1], H, W))
        count = images.new_zeros((1, 1, H, W))
        for (t, left, b, r), out in zip(windows, outputs, strict=True):
            logits[:, :, t:b, left:r] += out
            count[:, :, t:b, left:r] += 1
        return logits / count

    def single_pass(self, images: Tensor) -> Tensor:
        return (
            self.slide_logits(images) if self.inference_spec.mode == "slide" else self.model(images)
        )

    def predict_log_probs(self, images: Tensor) -> Tensor:
        """`(B, K, H, W)` log class probabilities at the images' size, over scales and flips."""
        spec = self.inference_spec
        if not spec.augmented:
            return self.single_pass(images).log_softmax(dim=1)
        H, W = images.shape[-2:]
        probs = None
        passes = 0
        for scale in spec.scales:
            size = (max(1, int(H * scale + 0.5)), max(1, int(W * scale + 0.5)))
            scaled = (
                images
                if size == (H, W)
                else F.interpolate(images, size, mode="bilinear", align_corners=False)
            )
            for flip in (False, True) if spec.flip else (False,):
                logits = self.single_pass(scaled.flip(-1) if flip else scaled)
                logits = logits.flip(-1) if flip else logits
                if logits.shape[-2:] != (H, W):
                    logits = F.interpolate(logits, (H, W), mode="bilinear", align_corners=False)
                probs = logits.softmax(dim=1) if probs is None else probs + logits.softmax(dim=1)
                passes += 1
        return (probs / passes).clamp(min=1e-12).log()

    def label_scores(self, batch: Mapping[str, Any]) -> list[tuple[Tensor, Tensor]]:
        """Per sample: log-probabilities `(K, h, w)` at its label map's size, and the label map."""
        log_probs = self.predict_log_probs(batch["image"])
        results = []
        for i in range(log_probs.shape[0]):
            ih, iw = batch["image_size"][i].tolist()
            lh, lw = batch["label_size"][i].tolist()
            scores = log_probs[i : i + 1, :, :ih, :iw]
            if (ih, iw) != (lh, lw):
                scores = F.interpolate(scores, (lh, lw), mode="bilinear", align_corners=False)
            results.append((scores[0], batch["label"][i, :lh, :lw]))
        return results

    # --------------------------------------------------------------------------------- evaluation
    def _eval_step(
        self, batch: Mapping[str, Any], metrics: SegmentationMetrics, prefix: str
    ) -> None:
        loss_sum = torch.zeros((), device=self.device)
        pixels = torch.zeros((), device=self.device)
        for scores, label in self.label_scores(batch):
            metrics.update(scores.argmax(dim=0), label)
            loss_sum += F.nll_loss(
                scores[None], label[None], ignore_index=self.ignore_index, reduction="sum"
            )
            pixels += (label != self.ignore_index).sum()
        self.log(
            f"{prefix}/loss",
            loss_sum / pixels.clamp(min=1),
            batch_size=len(batch["name"]),
            sync_dist=True,
        )

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_validation_epoch_end(self) -> None:
        self._finish_evaluation(self.val_metrics, "val")

    def on_test_epoch_end(self) -> None:
        self._finish_evaluation(self.test_metrics, "test")

    def _finish_evaluation(self, metrics: SegmentationMetrics, prefix: str) -> None:
        if self.trainer.sanity_checking:
            metrics.reset()
            return
        scores = metrics.compute()
        metrics.reset()
        for name in ("mIoU", "aAcc", "mAcc"):
            self.log(f"{prefix}/{name}", scores[name].float().nan_to_num(0.0), sync_dist=True)
        if not self.trainer.is_global_zero:
            return
        names = self.class_names()
        path = save_iou_csv(
            scores, names, Path(self.trainer.default_root_dir) / f"per_class_iou_{prefix}.csv"
        )
        if self.trainer.state.fn in ("validate", "test"):
            Console().print(iou_table(scores, names, title=f"Per-class IoU ({prefix}, %)"))
            Console().print(f"Per-class IoU:   {path}")

    def class_names(self) -> tuple[str, ...]:
        datamodule = getattr(self.trainer, "datamodule", None)
        model_names = (self.hparams.model_config or {}).get("class_names")
        names = tuple(model_names or getattr(datamodule, "class_names", ()) or ())
        return (
            names
            if len(names) == self.num_classes
            else tuple(f"class_{i}" for i in range(self.num_classes))
        )

    def predict_step(self, batch: Mapping[str, Any], batch_idx: int) -> list[Tensor]:
        """Predicted label maps (uint8 / int64 class indices) at each label map's size."""
        dtype = torch.uint8 if self.num_classes <= 256 else torch.long
        return [scores.argmax(dim=0).to(dtype) for scores, _ in self.label_scores(batch)]

    # ------------------------------------------------- display hook (pvtlab.callbacks.predictions)

    def predict_for_display(self, batch: Mapping[str, Any], limit: int) -> dict[str, Any]:
        """Predicted and true label maps of the first `limit` samples, with their images resized
        to the label maps' size."""
        sample = {
            k: v[:limit]
            for k, v in batch.items()
            if k in ("image", "label", "image_size", "label_size", "name")
        }
        images, labels, predictions = [], [], []
        for i, (scores, label) in enumerate(self.label_scores(sample)):
            ih, iw = sample["image_size"][i].tolist()
            image = sample["image"][i : i + 1, :, :ih, :iw]
            image = F.interpolate(image, label.shape[-2:], mode="bilinear", align_corners=False)
            images.append(image[0])
            labels.append(label)
            predictions.append(scores.argmax(dim=0))
        return {
            "kind": "segmentation",
            "images": images,
            "labels": labels,
            "predictions": predictions,
            "ignore_index": self.ignore_index,
        }

    def summary_rows(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """The paper's figure: mIoU in percent (of the test split when there is one)."""
        for prefix in ("test", "val"):
            if f"{prefix}/mIoU" in metrics:
                return {f"{prefix} mIoU (%)": f"{100 * metrics[f'{prefix}/mIoU']:.2f}"}
        return {}
