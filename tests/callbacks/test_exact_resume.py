"""Exact resume in-process: a run interrupted at any step and resumed from its last.ckpt ends with
the weights of the uninterrupted run (shuffling, augmentation noise, dropout, per-step schedule)."""

from __future__ import annotations

import random
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from pvtlab.callbacks.checkpointing import AtomicCheckpointIO, StepCheckpoint
from pvtlab.callbacks.resume import ExactResume, ResumableDataLoader

BATCHES_PER_EPOCH = 5
EPOCHS = 3


class NoisyData(Dataset):
    """Augmentation that draws from all three global generators, like real transforms do."""

    def __len__(self) -> int:
        return 4 * BATCHES_PER_EPOCH

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        x = torch.full((6,), float(index)) / 20 + torch.rand(6) * 0.1
        x = x * (1 + 0.1 * np.random.rand()) + random.random() * 0.01
        return x.float(), torch.tensor(index % 3)


class Data(L.LightningDataModule):
    def __init__(self, num_workers: int = 0) -> None:
        super().__init__()
        self.num_workers = num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(NoisyData(), batch_size=4, shuffle=True, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(NoisyData(), batch_size=10)


class Model(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", nn.functional.cross_entropy(self.net(x), y))

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.AdamW(self.parameters(), lr=0.05)
        # Reading estimated_stepping_batches here makes Lightning build the training loader before
        # it restores the loops (as pvtlab's TaskModule does): the loader state must still arrive.
        total = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / (total + 1))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class RunInterruptedError(Exception):
    pass


class Interrupt(L.Callback):
    """Stops the process's training after `step` optimizer steps (a stand-in for a kill)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step == self.step:
            raise RunInterruptedError


def fit(root: Path, ckpt_path: str | None = None, stop_at: int | None = None, workers: int = 0):
    L.seed_everything(0)
    model = Model()
    callbacks = [
        ExactResume(seed=0),
        StepCheckpoint(root / "checkpoints", every_n_train_steps=1),
        L.pytorch.callbacks.ModelCheckpoint(
            root / "checkpoints", save_last=True, enable_version_counter=False
        ),
    ]
    if stop_at is not None:
        callbacks.append(Interrupt(stop_at))
    trainer = L.Trainer(
        default_root_dir=root,
        max_epochs=EPOCHS,
        accelerator="cpu",
        deterministic=True,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
    )
    trainer.fit(model, datamodule=Data(workers), ckpt_path=ckpt_path)
    return model, trainer


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Tensor]:
    model, trainer = fit(tmp_path_factory.mktemp("uninterrupted"))
    assert trainer.global_step == EPOCHS * BATCHES_PER_EPOCH
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("stop_at", [1, 3, 5, 7, 10, 14])
def test_resumed_run_ends_with_the_uninterrupted_weights(
    stop_at: int, reference: dict[str, Tensor], tmp_path: Path
) -> None:
    with pytest.raises(RunInterruptedError):
        fit(tmp_path, stop_at=stop_at)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == stop_at
    model, trainer = fit(tmp_path / "resumed", ckpt_path=str(last))
    assert trainer.global_step == EPOCHS * BATCHES_PER_EPOCH
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference[name]), name


def test_the_loaders_place_is_saved_in_the_callbacks_state(tmp_path: Path) -> None:
    _, trainer = fit(tmp_path)
    loader = trainer.train_dataloader
    assert isinstance(loader, ResumableDataLoader)
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    saved = state["callbacks"][ExactResume.__qualname__]["loader"]
    assert saved["fetched"] == saved["done"] == BATCHES_PER_EPOCH and saved["epoch_done"]
