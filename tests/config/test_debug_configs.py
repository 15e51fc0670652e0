"""The debug presets (conf/debug/) and the trainer keys short runs override."""

from __future__ import annotations

from pathlib import Path

import pytest

from pvtlab.config import check_compatible
from tests.conftest import CONF_DIR, compose_config

# An experiment that asks for 8 GPUs under DDP (trainer=ddp, trainer.devices=8).
EIGHT_DEVICES = "experiment=table3_retinanet"
PRESETS = sorted(p.stem for p in (CONF_DIR / "debug").glob("*.yaml") if p.stem != "default")


def _assert_one_process(trainer) -> None:
    assert trainer.devices == 1
    assert trainer.num_nodes == 1
    assert trainer.strategy == "auto"


@pytest.mark.parametrize("debug", ["trainer=debug", "debug=fdr"])
def test_debug_runs_one_process_whatever_the_experiment(debug: str, tmp_path: Path) -> None:
    plain = compose_config([EIGHT_DEVICES], output_dir=tmp_path / "run")
    assert plain.trainer.devices == 8  # what the preset has to undo
    cfg = compose_config([EIGHT_DEVICES, debug], output_dir=tmp_path / "run")
    _assert_one_process(cfg.trainer)
    assert cfg.trainer.fast_dev_run is True
    assert cfg.data.loader.num_workers == 0


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_and_keeps_the_loggers(preset: str, tmp_path: Path) -> None:
    cfg = compose_config([f"debug={preset}"], output_dir=tmp_path / "run")
    check_compatible(cfg)
    _assert_one_process(cfg.trainer)
    assert "csv" in cfg.logger  # loggers stay on, so they can be tried quickly


def test_limit_preset_limits_every_split(tmp_path: Path) -> None:
    cfg = compose_config([EIGHT_DEVICES, "debug=limit"], output_dir=tmp_path / "run")
    _assert_one_process(cfg.trainer)
    assert cfg.trainer.limit_train_batches > 0 and cfg.trainer.limit_val_batches > 0
    assert cfg.logger.csv._target_.endswith("CSVLogger")


def test_overfit_preset_trains_at_a_constant_rate_for_every_task(tmp_path: Path) -> None:
    for task in ("classification", "detection", "segmentation"):
        cfg = compose_config([f"task={task}", "debug=overfit"], output_dir=tmp_path / "run")
        check_compatible(cfg)
        assert cfg.trainer.overfit_batches > 0
        assert cfg.task.scheduler.name == "constant"
        assert not cfg.task.scheduler.per_epoch


@pytest.mark.parametrize(
    "override",
    [
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=0.5",
        "trainer.overfit_batches=1",
        "trainer.fast_dev_run=3",
        "trainer.profiler=simple",
        "trainer.detect_anomaly=true",
        "trainer.val_check_interval=5",
    ],
)
def test_lightning_keys_are_overridden_without_plus(override: str, tmp_path: Path) -> None:
    cfg = compose_config([override], output_dir=tmp_path / "run")
    check_compatible(cfg)  # and each is an argument of lightning.Trainer
    key, value = override.removeprefix("trainer.").split("=")
    assert str(cfg.trainer[key]).lower() == value
