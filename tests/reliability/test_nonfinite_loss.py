"""A NaN loss stops the run naming the step and the loss; the last good checkpoint is kept."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.reliability.guards import NonFiniteLossError

NAN_STEP = 3


class PoisonBatch(L.Callback):
    """Fills the images of the batch of optimizer step `step` with NaN (a stand-in for bad data
    or an exploding run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, module: Any, batch: Any, *args: Any) -> None:
        if trainer.global_step == self.step:
            batch[0].fill_(float("nan"))


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_config(
        [
            "trainer.max_epochs=1",
            "+trainer.limit_train_batches=6",
            "trainer.num_sanity_val_steps=0",
            "data.batch_size=4",
            "data.num_workers=0",
            "+backbone.kwargs.depths=[1,1,1,1]",
            "+backbone.kwargs.embed_dims=[16,32,48,64]",
            "+backbone.kwargs.num_heads=[1,1,1,1]",
            "callbacks.step_checkpoint.every_n_train_steps=2",
            "callbacks.progress_bar=null",
            "+callbacks.poison._target_=tests.reliability.test_nonfinite_loss.PoisonBatch",
            f"+callbacks.poison.step={NAN_STEP}",
            "task.export_backbone=false",
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(NonFiniteLossError) as error:
        pipeline.train(cfg)
    message = str(error.value)
    assert f"at step {NAN_STEP} " in message and "train/loss=nan" in message
    last = torch.load(Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2  # the step-2 checkpoint, not one written after the NaN
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
