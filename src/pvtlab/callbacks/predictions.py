"""A Lightning callback drawing a few validation predictions every epoch (PNG, and W&B panels).

The task draws nothing itself: it answers `predict_for_display(batch, limit)` with plain tensors
(pvtlab.visualization documents the formats). The callback asks it on the first evaluation
batches until it has `num_images`, so the same handful of images (evaluation loaders do not
shuffle) is shown each epoch, for the cost of one forward pass over them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from pvtlab.visualization import Tile, class_names_of, draw_tiles, save_grid

log = logging.getLogger(__name__)


class PredictionPanels(L.Callback):
    """Draw `num_images` predictions per evaluation: `<dirpath>/epoch003_val.png` (or
    `test.png`, `validate.png` outside fitting), and `predictions/<stage>` images in W&B.

    Args:
        dirpath: folder of the PNG files (the run folder's `predictions/`).
        num_images: images per picture.
        stages: evaluations to draw (`val`, `test`).
        every_n_epochs: draw validation every n-th epoch (test is always drawn).
    """

    def __init__(
        self,
        dirpath: str | Path,
        num_images: int = 8,
        stages: tuple[str, ...] | list[str] = ("val", "test"),
        every_n_epochs: int = 1,
    ) -> None:
        super().__init__()
        self.dirpath = Path(dirpath)
        self.num_images = int(num_images)
        self.stages = tuple(stages)
        self.every_n_epochs = max(1, int(every_n_epochs))
        self._tiles: list[Tile] = []
        self.written: list[Path] = []

    # ------------------------------------------------------------------------------ collect
    def _wanted(self, trainer: L.Trainer, stage: str, dataloader_idx: int) -> bool:
        if stage not in self.stages or dataloader_idx != 0 or not trainer.is_global_zero:
            return False
        if trainer.sanity_checking or len(self._tiles) >= self.num_images:
            return False
        fitting = trainer.state.fn == "fit"
        return stage != "val" or not fitting or trainer.current_epoch % self.every_n_epochs == 0

    def _collect(self, trainer: L.Trainer, module: L.LightningModule, batch: Any) -> None:
        predict = getattr(module, "predict_for_display", None)
        if predict is None:
            return
        outputs = predict(batch, self.num_images - len(self._tiles))
        num_classes = int(getattr(module, "num_classes", 0) or _num_classes(module))
        names = class_names_of(trainer.datamodule, num_classes, _eval_datasets(trainer))
        self._tiles += draw_tiles(outputs, names)[: self.num_images - len(self._tiles)]

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._wanted(trainer, "val", dataloader_idx):
            self._collect(trainer, pl_module, batch)

    def on_test_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._wanted(trainer, "test", dataloader_idx):
            self._collect(trainer, pl_module, batch)

    # -------------------------------------------------------------------------------- write
    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer, "test")

    def _write(self, trainer: L.Trainer, stage: str) -> None:
        tiles, self._tiles = self._tiles, []
        if not tiles:
            return
        epoch = trainer.current_epoch
        if trainer.state.fn == "fit" and stage == "val":
            name, title = f"epoch{epoch:03d}_val.png", f"val predictions, epoch {epoch}"
        else:
            fn = getattr(trainer.state.fn, "value", trainer.state.fn)
            name, title = f"{fn}.png", f"{stage} predictions"
        path = save_grid(tiles, self.dirpath / name, title=title)
        self.written.append(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(
                    key=f"predictions/{stage}",
                    images=[picture.permute(1, 2, 0).numpy() for picture, _ in tiles],
                    caption=[caption for _, caption in tiles],
                    step=trainer.global_step,
                )


def _num_classes(module: L.LightningModule) -> int:
    config = getattr(module, "hparams", {}).get("model_config") or {}
    return int(config.get("num_classes") or 0)


def _eval_datasets(trainer: L.Trainer) -> list[Any]:
    datasets = []
    for loaders in (trainer.val_dataloaders, trainer.test_dataloaders):
        for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
            if loader is not None and hasattr(loader, "dataset"):
                datasets.append(loader.dataset)
    return datasets
