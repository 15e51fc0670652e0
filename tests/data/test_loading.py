"""One set of DataLoader defaults for every DataModule (pvtlab.data.loading)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from pvtlab.data.config import as_config
from pvtlab.data.loading import (
    LoaderConfig,
    LoaderSettings,
    default_num_workers,
    processes_on_this_node,
)
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
    with pytest.raises(ValueError, match=r"data\.loader\.num_workers=-1"):
        LoaderSettings.resolve(num_workers=-1)


def _cores(monkeypatch: pytest.MonkeyPatch, cores: int) -> None:
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(cores)), raising=False)


def test_the_processes_of_a_node_share_its_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    _cores(monkeypatch, 16)
    assert default_num_workers() == 8  # 15, capped
    assert [default_num_workers(n) for n in (2, 4, 8, 16)] == [7, 3, 1, 0]
    automatic = LoaderSettings.resolve(persistent_workers=True, prefetch_factor=4)
    shared = automatic.for_processes(4)
    assert (shared.num_workers, shared.persistent_workers, shared.prefetch_factor) == (3, True, 4)
    assert automatic.for_processes(16).persistent_workers is False  # no worker left
    assert "automatic_workers" not in shared.kwargs()
    chosen = LoaderSettings.resolve(num_workers=6)
    assert chosen.for_processes(8) == chosen  # a number the user set stays


def test_processes_on_this_node(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert processes_on_this_node(None) == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun
    assert processes_on_this_node(None) == 4

    class Trainer:
        num_devices = 8

    assert processes_on_this_node(Trainer()) == 8  # the Trainer, once attached, decides


@pytest.mark.parametrize("kind", ["classification", "detection", "segmentation"])
def test_under_ddp_every_datamodule_gives_its_process_a_share_of_the_workers(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = {"image_size": 32, "train_images": 16, "val_images": 16}
    dm = shapes_datamodule(kind, tmp_path, generator=generator, loader={"batch_size": 2})
    dm.setup("fit")
    _cores(monkeypatch, 16)

    class Trainer:  # what the DataModule reads of an attached DDP Trainer on 4 devices
        num_devices, world_size, global_rank = 4, 4, 0

    dm.trainer = Trainer()
    assert dm.train_dataloader().num_workers == 3 and dm.val_dataloader().num_workers == 3


@pytest.mark.parametrize("kind", ["classification", "detection", "segmentation"])
def test_every_datamodule_hands_its_settings_to_its_loaders(tmp_path: Path, kind: str) -> None:
    generator = {"image_size": 32, "train_images": 16, "val_images": 16}
    settings = {"batch_size": 2, "num_workers": 1, "persistent_workers": False}
    dm = shapes_datamodule(kind, tmp_path, generator=generator, loader=settings)
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert (loader.num_workers, loader.persistent_workers) == (1, False)
    assert loader.pin_memory == torch.cuda.is_available()


def test_a_config_group_replaces_only_the_fields_it_names() -> None:
    default = LoaderConfig(batch_size=2, eval_batch_size=1)
    assert as_config(None, default, "data.loader") is default
    node = OmegaConf.create({"batch_size": 8, "num_workers": 0})  # what Hydra passes
    config = as_config(node, default, "data.loader")
    assert config == LoaderConfig(batch_size=8, eval_batch_size=1, num_workers=0)
    assert config.settings() == LoaderSettings.resolve(num_workers=0)
    with pytest.raises(TypeError, match=r"unknown data\.loader setting\(s\) \['val_batch_size'\]"):
        as_config({"val_batch_size": 4}, default, "data.loader")
    with pytest.raises(ValueError, match=r"data\.loader\.batch_size=0"):
        LoaderConfig(batch_size=0)


@pytest.mark.parametrize("kind", ["classification", "detection", "segmentation"])
def test_every_datamodule_evaluates_at_eval_batch_size(tmp_path: Path, kind: str) -> None:
    generator = {"image_size": 32, "train_images": 8, "val_images": 8}
    settings = {"batch_size": 2, "eval_batch_size": 4, "num_workers": 0}
    dm = shapes_datamodule(kind, tmp_path, generator=generator, loader=settings)
    dm.setup("fit")
    assert dm.train_dataloader().batch_size == 2
    assert dm.val_dataloader().batch_size == 4 and dm.test_dataloader().batch_size == 4
