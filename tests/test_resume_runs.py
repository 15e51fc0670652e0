"""Resuming the right run: `ckpt_path=last` picks the run of this config, a resumed run continues
in its own folder, a checkpoint of another task or network is refused before anything is built,
and Ctrl-C / SIGTERM write a last checkpoint and name the resume command."""

from __future__ import annotations

import csv
import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.callbacks.checkpointing import TrainingInterruptedError
from pvtlab.config import ConfigError, save_resolved_config
from tests.conftest import compose_config

# A PVT of one block a stage on a few 64x64 shapes: four steps an epoch, every step logged.
TINY_RUN = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=1",
    "trainer.num_sanity_val_steps=0",
    "trainer.log_every_n_steps=1",
    "data.loader.batch_size=4",
    "data.loader.num_workers=0",
    "data.generator.train_images=32",
    "data.generator.val_images=8",
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "callbacks.prediction_panels=null",
    "test=false",
]


def config(runs: Path, name: str, data_dir: Path, *overrides: str) -> DictConfig:
    """A composed config whose Hydra run folder is `runs/<name>` (log_dir: `runs`), without its
    `hydra` node, as an application receives it."""
    cfg = compose_config([*TINY_RUN, *overrides], output_dir=runs / name, data_dir=data_dir)
    cfg.paths.output_dir = str(runs / name)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def fake_run(cfg: DictConfig) -> Path:
    """A run folder as training leaves it: the resolved config and a last checkpoint."""
    run = Path(cfg.paths.output_dir)
    save_resolved_config(cfg, run / "config.yaml")
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    description = pipeline.model_config(cfg)
    torch.save({"global_step": 0, "hyper_parameters": {"model_config": description}}, ckpt)
    return run


def test_last_resumes_the_newest_run_of_this_backbone_not_the_newest_run(
    tmp_path: Path, data_dir: Path
) -> None:
    tiny = fake_run(config(tmp_path, "a_tiny", data_dir, "backbone=pvt_tiny"))
    newer_small = fake_run(config(tmp_path, "b_small", data_dir, "backbone=pvt_small"))
    os.utime(tiny / "checkpoints" / "last.ckpt", (1, 1))  # the pvt_small run is the newest

    cfg = config(tmp_path, "c", data_dir, "backbone=pvt_tiny", "ckpt_path=last")
    assert pipeline.resolve_ckpt_path("last", cfg) == str(tiny / "checkpoints" / "last.ckpt")
    cfg = config(tmp_path, "d", data_dir, "backbone=pvt_small", "ckpt_path=last")
    assert pipeline.resolve_ckpt_path("last", cfg) == str(newer_small / "checkpoints/last.ckpt")


def test_last_without_a_matching_run_names_the_candidates_and_how_to_choose(
    tmp_path: Path, data_dir: Path
) -> None:
    tiny = fake_run(config(tmp_path, "a_tiny", data_dir, "backbone=pvt_tiny"))
    other_data = fake_run(
        config(tmp_path, "b_data", data_dir, "backbone=pvt_small", "data.generator.val_images=4")
    )
    cfg = config(tmp_path, "c", data_dir, "backbone=pvt_small")
    with pytest.raises(ConfigError) as error:
        pipeline.resolve_ckpt_path("last", cfg)
    message = str(error.value)
    assert str(tiny) in message and str(other_data) in message
    assert "backbone=pvt_tiny" in message and "resume=<run dir>" in message


def test_a_run_folder_resolves_to_its_last_checkpoint(tmp_path: Path, data_dir: Path) -> None:
    cfg = config(tmp_path, "a", data_dir)
    run = fake_run(cfg)
    assert pipeline.resolve_ckpt_path(str(run), cfg) == str(run / "checkpoints" / "last.ckpt")


@pytest.mark.parametrize("in_run_folder", [True, False])
def test_a_checkpoint_of_another_task_or_backbone_is_refused_before_data_is_built(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch, in_run_folder: bool
) -> None:
    ckpt = fake_run(config(tmp_path, "a", data_dir, "backbone=pvt_tiny")) / "checkpoints/last.ckpt"
    if not in_run_folder:  # then the checkpoint's own model_config describes it
        (ckpt.parent.parent / "config.yaml").unlink()

    def no_data(cfg: DictConfig) -> None:
        raise AssertionError("the data module was built")

    monkeypatch.setattr(pipeline, "build_datamodule", no_data)
    for choice, named in (("task=segmentation", "segmentation"), ("backbone=pvt_small", "pvt_s")):
        cfg = config(tmp_path, "b", data_dir, choice, f"ckpt_path={ckpt}")
        with pytest.raises(ConfigError) as error:
            pipeline.train(cfg)
        message = str(error.value)
        assert str(ckpt) in message and "pvt_tiny" in message and named in message, message


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_a_resumed_run_continues_in_its_own_folder_and_keeps_its_metrics(
    tmp_path: Path, data_dir: Path
) -> None:
    first = config(tmp_path, "a", data_dir)
    pipeline.train(first)
    run = Path(first.paths.output_dir)
    first_steps = {row["step"] for row in rows(run / "metrics.csv") if row.get("train/loss_step")}
    assert first_steps == {"0", "1", "2", "3"}

    # The second part's fresh Hydra folder, holding its log so far.
    fresh = tmp_path / "b"
    (fresh / ".hydra").mkdir(parents=True)
    handler = logging.FileHandler(fresh / "train.log")
    logging.getLogger().addHandler(handler)
    try:
        logging.getLogger().warning("a line of the second part")
        second = config(tmp_path, "b", data_dir, "trainer.max_epochs=2", "ckpt_path=last")
        pipeline.train(second)
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()

    assert not fresh.exists()
    assert "a line of the second part" in (run / "train.log").read_text()
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 8
    steps = [row["step"] for row in rows(run / "metrics.csv") if row.get("train/loss_step")]
    assert steps == [str(step) for step in range(8)]


class SignalAfterStep(L.Callback):
    """Sends `signum` to this process at the start of optimizer step `step`."""

    def __init__(self, step: int, signum: int) -> None:
        self.step, self.signum = step, signum

    def on_train_batch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_finishes_the_step_writes_last_and_names_the_resume_command(
    tmp_path: Path, data_dir: Path, signum: int
) -> None:
    handler_before = signal.getsignal(signal.SIGINT)
    cfg = config(
        tmp_path,
        "a",
        data_dir,
        "callbacks.model_checkpoint=null",  # the signal's checkpoint is the only one
        "+callbacks.kill._target_=tests.test_resume_runs.SignalAfterStep",
        "+callbacks.kill.step=1",
        f"+callbacks.kill.signum={int(signum)}",
    )
    with pytest.raises(TrainingInterruptedError) as error:
        pipeline.train(cfg)
    run = Path(cfg.paths.output_dir)
    assert torch.load(run / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 2
    assert f"resume={run}" in str(error.value) and "python src/train.py" in str(error.value)
    assert "trainer.limit_train_batches=4" in str(error.value)  # this run's own overrides
    assert signal.getsignal(signal.SIGINT) is handler_before
