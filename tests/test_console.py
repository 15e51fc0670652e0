"""What a run prints: user errors without a traceback, known noise filtered, the progress bar's
loss terms, a line per few steps without a bar, and a validation at the end of a short run."""

from __future__ import annotations

import errno
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.errors import InstantiationException
from torch.utils.data import DataLoader, TensorDataset

from pvtlab.callbacks.progress import CompileReport, StepLog, shown_losses
from pvtlab.callbacks.validation import ValidateAtLastStep
from pvtlab.config import ConfigError
from pvtlab.console import KNOWN_NOISE, exit_on_user_error, filter_known_noise
from tests.conftest import REPO

# ----------------------------------------------------------------------------------- user errors


def _raising(error: BaseException):
    @exit_on_user_error
    def main() -> None:
        raise error

    return main


def test_config_error_from_the_command_line_is_one_message_and_status_2(tmp_path: Path) -> None:
    """A detection head under the classification task: refused before any data is read."""
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "src" / "train.py"),
            "head=retinanet",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=REPO,
        env={**env, "WANDB_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output
    assert output.count("ConfigError: head=retinanet is a detection head") == 1


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("data.root=/nowhere: no such folder"),
        OSError(errno.ENOSPC, "No space left on device", "last.ckpt"),
        InstantiationException("Error in call to target"),  # wrapping a ConfigError below
    ],
    ids=["config", "disk_full", "wrapped"],
)
def test_user_errors_exit_with_status_2_and_one_line(
    error: BaseException, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    if isinstance(error, InstantiationException):
        error.__cause__ = ConfigError("num_classes=3 but the data set has 8 classes")
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exited:
        _raising(error)()
    assert exited.value.code == 2
    assert len(caplog.records) == 1
    assert "\n" not in caplog.records[0].getMessage()


def test_full_error_keeps_the_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    with pytest.raises(ConfigError):
        _raising(ConfigError("bad"))()


def test_a_bug_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    with pytest.raises(KeyError):
        _raising(KeyError("a bug"))()


# ------------------------------------------------------------------------------------ noise


def _warn_from(module: str, message: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        filter_known_noise()
        warnings.warn_explicit(message, UserWarning, "data_connector.py", 1, module=module)
    return caught


def test_listed_warning_is_silenced_and_others_are_not() -> None:
    module = "lightning.pytorch.trainer.connectors.data_connector"
    listed = "The 'train_dataloader' does not have many workers which may be a bottleneck."
    assert _warn_from(module, listed) == []
    assert len(_warn_from(module, "Something this run should know")) == 1


def test_listed_lightning_tip_is_silenced(caplog: pytest.LogCaptureFixture) -> None:
    tip = next(entry for entry in KNOWN_NOISE if entry.logger)
    logger = logging.getLogger(tip.module)
    filter_known_noise()
    with caplog.at_level(logging.INFO, logger=tip.module):
        logger.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        logger.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


# ---------------------------------------------------------------------------- progress


def test_progress_shows_the_total_and_at_most_three_terms_of_detr() -> None:
    logged = {"train/loss": torch.tensor(40.0)}
    for suffix in ("", "_0", "_1", "_2", "_3", "_4"):
        for term in ("ce", "bbox", "giou"):
            logged[f"train/loss_{term}{suffix}"] = torch.tensor(1.0)
    logged["train/loss_extra"] = torch.tensor(1.0)
    assert len(logged) == 20
    assert list(shown_losses(logged, max_terms=3)) == [
        "train/loss",
        "train/loss_ce",
        "train/loss_bbox",
        "train/loss_giou",
    ]
    assert list(shown_losses(logged, max_terms=1)) == ["train/loss", "train/loss_ce"]


class _Tiny(L.LightningModule):
    """A linear model on 10 batches of 2: just enough of a run to count validations."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validations: list[int] = []

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).square().mean()
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.layer(batch[0]).square().mean())

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.validations.append(self.trainer.global_step)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(20, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


def _fit(tmp_path: Path, callbacks: list, **trainer_kwargs) -> _Tiny:
    module = _Tiny()
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **trainer_kwargs,
    )
    trainer.fit(module)
    return module


def test_a_run_shorter_than_an_epoch_validates_once_at_its_end(tmp_path: Path) -> None:
    assert _fit(tmp_path, [], max_steps=3).validations == []  # Lightning alone: never
    assert _fit(tmp_path, [ValidateAtLastStep()], max_steps=3).validations == [3]


def test_a_run_ending_at_an_epoch_end_validates_once_there(tmp_path: Path) -> None:
    assert _fit(tmp_path, [ValidateAtLastStep()], max_steps=20).validations == [10, 20]


def test_without_a_bar_a_line_every_log_interval(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pvtlab.callbacks.progress"):
        _fit(tmp_path, [StepLog()], max_steps=4, log_every_n_steps=2)
    lines = [r.getMessage() for r in caplog.records if r.name == "pvtlab.callbacks.progress"]
    assert len(lines) == 2
    assert "step 2/4" in lines[0] and "loss" in lines[0] and "lr 0.1" in lines[0]
    assert "steps/s" in lines[1]


def test_compile_says_it_compiles_and_how_long_the_first_batch_took(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="pvtlab.callbacks.progress"):
        _fit(tmp_path, [CompileReport()], max_steps=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "pvtlab.callbacks.progress"]
    assert len(lines) == 2
    assert "compiling" in lines[0] and "took" in lines[1]
