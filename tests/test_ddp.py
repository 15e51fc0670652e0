"""Two-process DDP on CPU (gloo) for each task: it trains and evaluates in one run folder, and its
validation figures, reduced across the ranks, equal a one-process evaluation of the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from tests.conftest import REPO

TINY_BACKBONE = [
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
]
# Validation sets of 400 / 100 / 400 images: even, so the distributed sampler pads nothing.
TASKS = {
    "classification": (["task=classification", "data.loader.num_workers=0"], "val/loss"),
    # Every score kept: an untrained detector's few boxes still reach COCOeval from both ranks.
    "retinanet": (
        [
            "task=detection",
            "head=retinanet",
            "head.score_thresh=0.0",
            "head.detections_per_img=10",
            "head.fpn_channels=32",
            "data.loader.num_workers=0",
        ],
        "val/mAP",
    ),
    "semantic_fpn": (
        ["task=segmentation", "head=semantic_fpn", "data.loader.num_workers=0"],
        "val/mIoU",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TASKS))
def test_ddp_cpu_run_trains_evaluates_and_reduces_over_ranks(
    name: str, tmp_path: Path, data_dir: Path, make_config: Callable[..., DictConfig]
) -> None:
    overrides, metric = TASKS[name]
    command = [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *overrides,
        *TINY_BACKBONE,
        "trainer=ddp_cpu",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.num_sanity_val_steps=0",
        "callbacks.progress_bar=null",
        "test=false",
        f"paths.log_dir={tmp_path / 'outputs'}",
        f"paths.data_dir={data_dir}",
    ]
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"

    runs = list((tmp_path / "outputs").glob("*/runs/*"))
    assert len(runs) == 1, runs  # rank 1 writes into rank 0's run folder
    run = runs[0]
    assert (run / "train_ddp_process_1.log").is_file()
    distributed = json.loads((run / "metrics.json").read_text())
    (best,) = (run / "checkpoints").glob("best-*.ckpt")

    cfg = make_config([*overrides, f"ckpt_path={best}", "split=val"], config_name="eval")
    with open_dict(cfg):
        del cfg["hydra"]
    single = pipeline.evaluate(cfg)
    assert distributed[metric] == pytest.approx(single[metric], rel=1e-5, abs=1e-6)

    if name == "retinanet":  # the predictions of both ranks were gathered, for every image
        (predictions,) = (run / "predictions").glob("val_epoch000.json")
        image_ids = {p["image_id"] for p in json.loads(predictions.read_text())}
        assert len(image_ids) == 100
