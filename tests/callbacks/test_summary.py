"""The run-start model summary shows the network's parameters and GMACs, not Lightning's 0 FLOPs."""

from __future__ import annotations

import lightning as L
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

import pvtlab  # noqa: F401  (registers the PVT models)
from pvtlab.callbacks.summary import ComplexitySummary
from pvtlab.data.transforms import ClassificationTransformConfig
from pvtlab.models import count_gmacs


class TinyClassifier(L.LightningModule):
    kind = "classification"

    def __init__(self) -> None:
        super().__init__()
        self.model = timm.create_model("pvt_tiny", num_classes=2, img_size=32, depths=(1, 1, 1, 1))

    def training_step(self, batch, batch_idx):
        images, labels = batch
        return torch.nn.functional.cross_entropy(self.model(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class TinyData(L.LightningDataModule):
    """Its evaluation input size is in its transform settings, as pvtlab's data modules hold it."""

    transforms = ClassificationTransformConfig(image_size=48)

    def train_dataloader(self) -> DataLoader:
        images = torch.randn(2, 3, 32, 32)
        return DataLoader(TensorDataset(images, torch.tensor([0, 1])), batch_size=2)


def test_summary_shows_parameters_and_gmacs(capsys) -> None:
    module = TinyClassifier()
    trainer = L.Trainer(
        max_steps=1,
        callbacks=[ComplexitySummary()],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=TinyData())
    out = capsys.readouterr().out
    size = (48, 48)  # the data module's evaluation size
    params = sum(p.numel() for p in module.model.parameters())
    gmacs = count_gmacs(module.model, size)
    assert (
        f"network: {params / 1e6:.2f} M parameters, {gmacs:.2f} GMACs at {size[0]}x{size[1]}" in out
    )
    assert "FLOPs" not in out
