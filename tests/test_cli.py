"""The real command line, in a subprocess, as a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

DEBUG_RUNS = {
    "classification": ["task=classification"],
    "retinanet": ["task=detection", "head=retinanet"],
    "mask_rcnn": ["task=detection", "head=mask_rcnn"],
    "detr": ["task=detection", "head=detr"],
    "semantic_fpn": ["task=segmentation", "head=semantic_fpn"],
    "trans2seg": ["task=segmentation", "head=trans2seg"],
}


def run_cli(
    script: str, args: list[str], tmp_path: Path, data_dir: Path, timeout: float = 900
) -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        str(REPO / "src" / script),
        *args,
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={data_dir}",
    ]
    result = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, (
        f"{' '.join(command)}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    )
    return result


@pytest.mark.parametrize("name", list(DEBUG_RUNS))
def test_debug_run_of_each_task_and_head(name: str, tmp_path: Path, data_dir: Path) -> None:
    result = run_cli("train.py", [*DEBUG_RUNS[name], "trainer=debug"], tmp_path, data_dir)
    assert "Results" in result.stdout
    runs = list((tmp_path / "outputs").glob("*/runs/*"))
    assert len(runs) == 1
    assert (runs[0] / "config.yaml").is_file()
    assert (runs[0] / ".hydra" / "config.yaml").is_file()


def test_unknown_group_choice_lists_the_valid_ones(tmp_path: Path, data_dir: Path) -> None:
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run(
        [sys.executable, str(REPO / "src" / "train.py"), "backbone=pvt_huge", "trainer=debug"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "pvt_small" in result.stderr + result.stdout
