"""Sweeps through the real command line: one folder, W&B run and metrics per job, one summary."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

# A few batches of 64x64 shapes: the plumbing, not the learning.
TINY = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "callbacks=none",
    "data.generator.train_images=32",
    "data.generator.val_images=16",
    "data.loader.num_workers=0",
]


def _multirun(args: list[str], log_dir: Path, data_dir: Path) -> tuple[Path, str]:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        "-m",
        *args,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (
        f"{' '.join(command)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    (sweep,) = (log_dir / "experiments").glob("*/*")
    return sweep, result.stdout


@pytest.fixture(scope="module")
def two_job_sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("sweep")
    # The command line's backbone replaces the experiment's sweep list; the lr is swept instead.
    args = [
        "experiment=table2_classification_smoke",
        "backbone=pvt_tiny",
        "task.optimizer.lr=0.001,0.002",
        "logger=[csv,wandb]",
    ]
    return _multirun([*args, *TINY, "data.loader.batch_size=8"], root / "outputs", root / "data")


@pytest.mark.slow
def test_two_job_multirun_end_to_end(two_job_sweep: tuple[Path, str]) -> None:
    sweep, stdout = two_job_sweep
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    groups = set()
    for job, lr in zip(jobs, (0.001, 0.002), strict=True):
        config = yaml.safe_load((job / "config.yaml").read_text())
        assert config["backbone"]["name"] == "pvt_tiny"
        assert config["task"]["optimizer"]["lr"] == lr
        assert (job / "metrics.json").is_file() and (job / "metrics.csv").is_file()
        assert len(list((job / "wandb").glob("offline-run-*"))) == 1  # its own W&B run
        groups.add(config["logger"]["wandb"]["group"])
    assert groups == {f"experiments-table2_classification_smoke-{sweep.name}"}
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | 0.001 |" in summary and "| 1 | 0.002 |" in summary
    assert (sweep / "summary.png").is_file()
    assert (
        "| job | task.optimizer.lr | test/acc1 (%)" in stdout
    )  # printed at the end of the multirun


@pytest.mark.slow
def test_collate_script_on_the_multirun(two_job_sweep: tuple[Path, str], tmp_path: Path) -> None:
    sweep, _ = two_job_sweep
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "collate.py"), str(sweep), "--out", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "summary.md").read_text()
    assert table == (sweep / "summary.md").read_text()
    assert (tmp_path / "summary.png").is_file()


@pytest.mark.slow
def test_pretrain_then_finetune_by_path(tmp_path: Path) -> None:
    """figure5_pretraining_smoke: job 0 exports a backbone that job 1 fine-tunes; job 2 does not."""
    sweep, _ = _multirun(
        ["experiment=figure5_pretraining_smoke", "logger=csv", *TINY, "data.loader.batch_size=4"],
        tmp_path / "outputs",
        tmp_path / "data",
    )
    exported = sweep / "0" / "backbone.pth"
    assert exported.is_file()
    pretrained = [
        yaml.safe_load((sweep / str(i) / "config.yaml").read_text())["backbone"]["pretrained"]
        for i in (1, 2)
    ]
    assert pretrained == [str(exported), None]
    summary = (sweep / "summary.md").read_text()
    for row in ("| 0 | pretrain |", "| 1 | pretrained |", "| 2 | scratch |"):
        assert row in summary
