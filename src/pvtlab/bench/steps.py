"""Training steps measured through the real pipeline: a composed run config, its DataModule and
task, fitted by a Lightning Trainer for a few steps while a callback times each batch."""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict

from pvtlab.bench import PeakMemory

__all__ = ["HEADS", "StepResult", "StepTimer", "compose_run", "measure_training_step"]

CONF_DIR = Path(__file__).resolve().parents[3] / "conf"
# Every task and head, as (task, head).
HEADS: tuple[tuple[str, str], ...] = (
    ("classification", "linear"),
    ("detection", "retinanet"),
    ("detection", "mask_rcnn"),
    ("detection", "detr"),
    ("segmentation", "semantic_fpn"),
    ("segmentation", "trans2seg"),
)
# Few, small shapes images for quick runs (the tests): generation takes seconds.
QUICK_DATA = (
    "data.generator.train_images=32",
    "data.batch_size=8",  # at least 4 batches of every kind (classification drops the last)
    "data.generator.val_images=8",
    "data.num_workers=0",
)


def compose_run(overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """A `src/train.py` config, composed as the command line would, writing under `output_dir`."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(output_dir)
    HydraConfig.instance().set_config(cfg)
    output_dir.mkdir(parents=True, exist_ok=True)  # as Hydra makes it: runs write files there
    return cfg


class StepTimer(L.Callback):
    """Wall-clock seconds of every training batch (forward, backward and optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._start)


@dataclass
class StepResult:
    batch: int
    images_per_s: float
    step_s: float
    first_step_s: float  # includes compilation when compiled
    peak_mib: float | None


def measure_training_step(
    task: str,
    head: str,
    backbone: str,
    data_dir: Path,
    *,
    steps: int = 3,
    warmup: int = 1,
    compile: bool = False,
    precision: str = "32-true",
    extra: Sequence[str] = (),
) -> StepResult:
    """Fit `steps + warmup` training batches of the shapes recipe; time the last `steps`."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(
            [
                f"task={task}",
                f"head={head}",
                f"backbone={backbone}",
                "data=shapes",
                "logger=none",
                "callbacks=none",
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={tmp}",
                f"trainer.precision={precision}",
                f"trainer.max_steps={steps + warmup}",
                "trainer.max_epochs=-1",
                "+trainer.limit_val_batches=0",
                "trainer.num_sanity_val_steps=0",
                "+trainer.enable_checkpointing=false",
                "+trainer.enable_progress_bar=false",
                "trainer.enable_model_summary=false",
                f"compile={str(compile).lower()}",
                *extra,
            ],
            Path(tmp) / "run",
        )
        from pvtlab.pipeline import build_task

        L.seed_everything(0, verbose=False)
        datamodule = instantiate(cfg.data)
        module = build_task(cfg)
        if compile:
            module.compile_model()
        timer = StepTimer()
        trainer = instantiate(cfg.trainer, callbacks=[timer], logger=False)
        with PeakMemory("cpu") as peak:
            trainer.fit(module, datamodule=datamodule)
        batch = int(cfg.data.batch_size)
    timed = timer.times[warmup:] or timer.times
    step = statistics.median(timed)
    return StepResult(batch, batch / step, step, timer.times[0], peak.mib)
