"""Shared fixtures: configs composed with the Hydra compose API, outputs and data under tmp dirs."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parents[1]
CONF_DIR = REPO / "conf"

# No test talks to W&B's servers.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def compose_config(
    overrides: Sequence[str] = (),
    config_name: str = "train",
    output_dir: Path | None = None,
    data_dir: Path | None = None,
) -> DictConfig:
    """Compose like the CLI does; `${hydra:...}` interpolations resolve as in a real run."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name, overrides=list(overrides), return_hydra_config=True)
    if output_dir is not None:
        with open_dict(cfg):
            cfg.hydra.runtime.output_dir = str(output_dir)
            cfg.paths.log_dir = str(output_dir.parent)
    HydraConfig.instance().set_config(cfg)
    if data_dir is not None:
        cfg.paths.data_dir = str(data_dir)
    return cfg


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One data folder per test session: the shapes cache is generated once and shared."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture
def make_config(tmp_path: Path, data_dir: Path) -> Callable[..., DictConfig]:
    """`make_config(["task=detection", ...])`: a composed config writing under tmp_path."""

    def make(overrides: Sequence[str] = (), config_name: str = "train") -> DictConfig:
        return compose_config(
            overrides, config_name, output_dir=tmp_path / "run", data_dir=data_dir
        )

    return make
