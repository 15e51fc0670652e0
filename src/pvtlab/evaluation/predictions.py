"""An evaluation's per-image classification results, `predictions.csv`, written beside its
`metrics.json` (detection writes COCO's results json itself: `DetectionTask(predictions_dir=)`)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
from torch import Tensor


class ClassificationPredictions(L.Callback):
    """Rows of `file, label, class_1, probability_1, ..., class_k, probability_k`, in the
    evaluation loader's order (one process: the loader is sequential, so row i is sample i).

    The logits are read with a forward hook on the task's network, so the task's steps and the
    scores stay as they are.
    """

    def __init__(self, path: str | Path, class_names: Sequence[str] | None, top_k: int = 5) -> None:
        self.path = Path(path)
        self.class_names = list(class_names) if class_names else None
        self.top_k = top_k
        self._logits: list[Tensor] = []
        self._rows: list[list[Any]] = []
        self._hook: Any = None

    def _name(self, label: int) -> str:
        return self.class_names[label] if self.class_names else str(label)

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or trainer.world_size > 1:
            return
        self._rows, self._logits = [], []
        self._hook = pl_module.model.register_forward_hook(
            lambda module, inputs, output: self._logits.append(output.detach().float().cpu())
        )

    def _batch(self, trainer: L.Trainer, batch: Any) -> None:
        if self._hook is None or not self._logits:
            return
        logits, targets = self._logits[-1], batch[1]
        self._logits.clear()
        dataset = self._dataset(trainer)
        samples = getattr(dataset, "samples", None)
        probabilities = logits.softmax(dim=1)
        top = probabilities.topk(min(self.top_k, probabilities.shape[1]), dim=1)
        for values, labels, target in zip(top.values, top.indices, targets.tolist(), strict=True):
            index = len(self._rows)
            row: list[Any] = [samples[index][0] if samples else index, self._name(target)]
            for p, label in zip(values.tolist(), labels.tolist(), strict=True):
                row += [self._name(label), f"{p:.6f}"]
            self._rows.append(row)

    def _dataset(self, trainer: L.Trainer) -> Any:
        loaders = trainer.val_dataloaders if trainer.validating else trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        return getattr(loader, "dataset", None)

    def _end(self) -> None:
        if self._hook is None:
            return
        self._hook.remove()
        self._hook = None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("w", newline="") as file:
            writer = csv.writer(file)
            header = ["file", "label"]
            for rank in range(1, self.top_k + 1):
                header += [f"class_{rank}", f"probability_{rank}"]
            writer.writerow(header)
            writer.writerows(self._rows)

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch(trainer, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._batch(trainer, batch)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end()
