"""One set of DataLoader defaults for every DataModule (pvtlab.data.loading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pvtlab.data.loading import LoaderSettings, default_num_workers
from pvtlab.data.shapes import shapes_datamodule


def test_defaults_resolve_workers_pinning_and_prefetch() -> None:
    settings = LoaderSettings.resolve()
    assert settings.num_workers == default_num_workers()
    assert 0 <= settings.num_workers <= 8
    assert settings.pin_memory == torch.cuda.is_available()
    assert settings.persistent_workers == (settings.num_workers > 0)


def test_without_workers_nothing_persists_or_prefetches() -> None:
    settings = LoaderSettings.resolve(num_workers=0, persistent_workers=True, prefetch_factor=4)
    assert (settings.persistent_workers, settings.prefetch_factor) == (False, None)
    assert LoaderSettings.resolve(num_workers=2, prefetch_factor=4).prefetch_factor == 4


def test_pinning_needs_a_cuda_device() -> None:
    assert LoaderSettings.resolve(pin_memory=False).pin_memory is False
    assert LoaderSettings.resolve(pin_memory=True).pin_memory == torch.cuda.is_available()


def test_negative_workers_is_an_error_naming_the_key() -> None:
    with pytest.raises(ValueError, match=r"data\.num_workers=-1"):
        LoaderSettings.resolve(num_workers=-1)


@pytest.mark.parametrize("kind", ["classification", "detection", "segmentation"])
def test_every_datamodule_hands_its_settings_to_its_loaders(tmp_path: Path, kind: str) -> None:
    generator = {"image_size": 32, "train_images": 16, "val_images": 16}
    dm = shapes_datamodule(
        kind, tmp_path, generator=generator, num_workers=1, persistent_workers=False, batch_size=2
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.persistent_workers) == (1, False)
    assert loader.pin_memory == torch.cuda.is_available()
