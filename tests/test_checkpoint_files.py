"""A file that is not a checkpoint is a clear ConfigError, before any data is read; checkpoints
load with weights_only=True everywhere."""

from __future__ import annotations

import re
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.config import ConfigError
from tests.conftest import REPO


def _runnable(cfg: DictConfig, data_root: Path) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.paths.data_dir = str(data_root)
    return cfg


@pytest.mark.parametrize("entry", [pipeline.train, pipeline.evaluate])
def test_text_file_as_checkpoint_is_a_clear_error(
    entry: Callable, make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    fake = tmp_path / "notes.ckpt"
    fake.write_text("not a checkpoint")
    config = "train" if entry is pipeline.train else "eval"
    cfg = _runnable(make_config([f"ckpt_path={fake}"], config_name=config), tmp_path / "no-data")
    with pytest.raises(ConfigError, match="is not a checkpoint"):
        entry(cfg)
    assert not (tmp_path / "no-data").exists()


def test_zip_that_is_no_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    fake = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(fake, "w") as archive:
        archive.writestr("readme.txt", "hello")
    with pytest.raises(ConfigError, match="is not a loadable checkpoint"):
        pipeline.read_checkpoint(fake)


def test_every_torch_load_uses_weights_only() -> None:
    calls = []
    for path in (REPO / "src").rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(", text):
            end = text.find("\n)", match.start())
            call = text[match.start() : text.find(")", match.start()) + 1]
            if (
                "weights_only=True" not in call
                and "weights_only=True" not in text[match.start() : end]
            ):
                calls.append(f"{path.relative_to(REPO)}: {call}")
    assert not calls, calls
