"""A bad config is one ConfigError, with the valid choices or keys, before any data is read."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.config import ConfigError, check_compatible
from tests.conftest import REPO


def _runnable(cfg: DictConfig, data_root: Path) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.paths.data_dir = str(data_root)  # nothing there: reading data would fail differently
    return cfg


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["+trainer.max_epoch=3"], ["trainer.max_epoch is not an argument", "max_epochs"]),
        (["+callbacks.model_checkpoint.every_n_step=3"], ["every_n_train_steps", "Valid keys"]),
        (["trainer.max_epochs=ten"], ["trainer.max_epochs='ten' is a str", "int"]),
        (["trainer.deterministic=maybe"], ["trainer.deterministic='maybe'"]),
        (["data=imagenet", "data.loader.batch_size=big"], ["data.loader.batch_size='big'", "int"]),
        (["task=detection", "+task.score_thresh=0.1"], ["task.score_thresh", "Valid keys"]),
        (["+head.features_only=false"], ["head.features_only is not an argument", "Valid keys"]),
        (["backbone.drop_path_rate=high"], ["backbone.drop_path_rate='high' is a str", "float"]),
        (["task=detection", "+head.anchor_size=[16]"], ["Did you mean head.anchor_sizes?"]),
    ],
)
def test_unknown_key_or_wrong_type_is_one_clear_error_before_data(
    overrides: list[str],
    expected: list[str],
    make_config: Callable[..., DictConfig],
    tmp_path: Path,
) -> None:
    cfg = _runnable(make_config(overrides), tmp_path / "no-data")
    with pytest.raises(ConfigError) as error:
        pipeline.train(cfg)
    for text in expected:
        assert text in str(error.value)
    assert not (tmp_path / "no-data").exists()


def test_default_configs_pass_the_argument_check(make_config: Callable[..., DictConfig]) -> None:
    for overrides in (
        [],
        ["task=detection", "head=mask_rcnn"],
        ["task=detection", "head=detr"],
        ["task=segmentation", "head=trans2seg"],
        ["data=coco", "task=detection"],
        ["trainer=ddp_cpu"],
    ):
        check_compatible(make_config(overrides))


def test_cli_unknown_key_names_the_valid_ones(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "train.py"),
            "+trainer.max_epoch=3",
            f"paths.log_dir={tmp_path / 'outputs'}",
            f"paths.data_dir={tmp_path / 'no-data'}",
        ],
        cwd=REPO,
        env=dict(os.environ, WANDB_MODE="offline"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "ConfigError" in output and "Did you mean trainer.max_epochs?" in output
    assert not (tmp_path / "no-data").exists()
