"""Object detection and instance segmentation: any pvtlab detection head, scored by COCOeval.

A head (RetinaNet, Mask R-CNN, DETR, ...) follows one interface (docs/design.md): in training
`model(images, targets)` returns a dict of losses, summed here into `train/loss`; in evaluation
`model(images)` returns per image `{boxes, scores, labels[, masks]}`, boxes xyxy in the pixels of
the image given, labels 0-based. Evaluation rescales them to the original images, maps labels
back to the data set's category ids, writes the COCO results json of every evaluation to
`predictions_dir`, and logs COCOeval's figures (`val/mAP`, `val/mAP_50`, ..., `val/segm_mAP`
when the head predicts masks). No `val/loss`: detectors in eval mode return detections only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from pvtlab.evaluation.coco import CocoEvaluator
from pvtlab.tasks.base import TaskModule

log = logging.getLogger(__name__)

Batch = tuple[Sequence[Tensor], Sequence[Mapping[str, Any]]]


class DetectionTask(TaskModule):
    """LightningModule of `task=detection`.

    Args:
        model: the detection network (backbone + head) built by the pipeline.
        model_config: its plain description (saved in checkpoints).
        optimizer: keyword arguments of `pvtlab.tasks.optim.build_optimizer`.
        scheduler: fields of `pvtlab.tasks.optim.ScheduleSpec`.
        predictions_dir: folder receiving `<stage>_epoch<NNN>.json` (COCO results) at each
            evaluation; None writes none.

    The evaluation data set must expose `coco` (the pycocotools index of its json) and
    `categories.category_ids` (the category id of each label), as
    `pvtlab.data.coco.CocoDetection` does.
    """

    kind = "detection"
    monitor = "val/mAP"

    def __init__(
        self,
        model: nn.Module,
        model_config: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        scheduler: Mapping[str, Any] | None = None,
        predictions_dir: str | None = None,
    ) -> None:
        super().__init__(model, model_config, optimizer, scheduler)
        self.predictions_dir = predictions_dir
        self._evaluators: dict[str, CocoEvaluator] = {}

    def forward(
        self, images: Sequence[Tensor], targets: Sequence[Mapping[str, Tensor]] | None = None
    ) -> Any:
        return (
            self.model(list(images)) if targets is None else self.model(list(images), list(targets))
        )

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        images, targets = batch
        losses = self.model(list(images), list(targets))
        loss = sum(losses.values())
        size = len(images)
        # Not prog_bar: Lightning would read it back every batch (see PeriodicLossProgressBar).
        self.log("train/loss", loss, batch_size=size)
        self.log_dict({f"train/{k}": v.detach() for k, v in losses.items()}, batch_size=size)
        return loss

    # ---------------------------------------------------------------- evaluation

    def on_validation_epoch_start(self) -> None:
        self._evaluator("val").reset()

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate_batch("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._finish("val")

    def on_test_epoch_start(self) -> None:
        self._evaluator("test").reset()

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._evaluate_batch("test", batch)

    def on_test_epoch_end(self) -> None:
        self._finish("test")

    def _evaluate_batch(self, stage: str, batch: Batch) -> None:
        images, targets = batch
        if not len(images):  # every image of the batch was unreadable and skipped
            return
        if getattr(self.model, "pastes_masks_at_size", False):
            # Masks pasted at the original image size, as mmdetection scores them.
            sizes = [tuple(int(s) for s in t["orig_size"]) for t in targets]
            predictions = self.model(list(images), mask_sizes=sizes)
        else:
            predictions = self.model(list(images))
        self._evaluator(stage).update(predictions, targets)

    def _evaluator(self, stage: str) -> CocoEvaluator:
        loaders = self.trainer.val_dataloaders if stage == "val" else self.trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        dataset = loader.dataset
        if not hasattr(dataset, "coco") or not hasattr(dataset, "categories"):
            raise TypeError(
                f"DetectionTask scores with COCOeval: the {stage} dataset "
                f"({type(dataset).__name__}) must expose `coco` (pycocotools COCO) and "
                "`categories.category_ids`, as pvtlab.data.coco.CocoDetection does"
            )
        evaluator = self._evaluators.get(stage)
        if evaluator is None or evaluator.coco_gt is not dataset.coco:
            evaluator = CocoEvaluator(dataset.coco, dataset.categories.category_ids)
            self._evaluators[stage] = evaluator
        return evaluator

    def _finish(self, stage: str) -> None:
        path = None
        if self.predictions_dir and not self.trainer.sanity_checking:
            path = Path(self.predictions_dir) / f"{stage}_epoch{self.current_epoch:03d}.json"
        metrics, tables = self._evaluator(stage).compute(path)
        if tables and not self.trainer.sanity_checking:  # one table per real evaluation
            log.info("%s\n%s", f"{stage} predictions: {path}" if path else stage, tables)
        # Every process holds the same (broadcast) figures: the mean over processes is exact.
        self.log_dict({f"{stage}/{k}": v for k, v in metrics.items()}, sync_dist=True)
        self._evaluator(stage).reset()

    # ------------------------------------------------- display hook (pvtlab.callbacks.predictions)

    def predict_for_display(self, batch: Batch, limit: int) -> dict[str, Any]:
        """Detections (input pixels, 0-based labels) on the first `limit` images of a batch."""
        images, targets = list(batch[0][:limit]), list(batch[1][:limit])
        predictions = self.model(images) if images else []
        return {
            "kind": "detection",
            "images": images,
            "targets": targets,
            "predictions": predictions,
        }

    def summary_rows(self, metrics: Mapping[str, float]) -> dict[str, str]:
        """Box (and mask) AP in percent, as the paper's tables print them."""
        rows = {}
        for stage in ("test", "val"):
            for key, label in (("mAP", "box AP (%)"), ("segm_mAP", "mask AP (%)")):
                value = metrics.get(f"{stage}/{key}")
                if value is not None and label not in rows:
                    rows[label] = f"{100 * value:.1f} ({stage})"
        return rows
