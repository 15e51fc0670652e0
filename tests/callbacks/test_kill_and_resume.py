"""SIGKILL a real training run mid-epoch, resume it with ckpt_path=last, and compare its final
weights with those of the same run left alone (trainer.deterministic=true, CPU)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO

# A small PVT on 64x64 shapes: two epochs of six steps, last.ckpt after every step.
TINY_RUN = [
    "task=classification",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.deterministic=true",
    "data.loader.batch_size=8",
    "data.loader.num_workers=0",
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "task.export_backbone=false",
    "test=false",
]
TOTAL_STEPS = 12


def command(log_dir: Path, data_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(REPO / "src" / "train.py"),
        *TINY_RUN,
        *extra,
        f"paths.log_dir={log_dir}",
        f"paths.data_dir={data_dir}",
    ]


def run(args: list[str]) -> None:
    env = dict(os.environ, WANDB_MODE="offline")
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (
        f"{' '.join(args)}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )


def last_checkpoint(log_dir: Path) -> dict:
    (path,) = sorted(
        log_dir.glob("classification/runs/*/checkpoints/last.ckpt"), key=os.path.getmtime
    )[-1:]
    return torch.load(path, map_location="cpu", weights_only=True)


def kill_after_step(args: list[str], log_dir: Path, step: int) -> int:
    """Start the run, SIGKILL it once its last.ckpt holds at least `step` steps; the step saved."""
    env = dict(os.environ, WANDB_MODE="offline")
    process = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                pytest.fail(
                    f"the run ended before it was killed:\n{process.stderr.read().decode()[-3000:]}"
                )
            found = list(log_dir.glob("classification/runs/*/checkpoints/last.ckpt"))
            if found and torch.load(found[0], weights_only=True)["global_step"] >= step:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        else:
            pytest.fail("no checkpoint within 600 s")
    finally:
        process.kill()
        process.wait()
    return last_checkpoint(log_dir)["global_step"]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_ends_with_the_uninterrupted_weights(
    tmp_path: Path, data_dir: Path
) -> None:
    reference_dir, killed_dir = tmp_path / "reference", tmp_path / "killed"
    run(command(reference_dir, data_dir))
    reference = last_checkpoint(reference_dir)
    assert reference["global_step"] == TOTAL_STEPS

    saved_step = kill_after_step(command(killed_dir, data_dir), killed_dir, step=3)
    assert 3 <= saved_step < TOTAL_STEPS, "killed too late to test a resume"
    run(command(killed_dir, data_dir, "ckpt_path=last"))
    resumed = last_checkpoint(killed_dir)

    assert resumed["global_step"] == TOTAL_STEPS
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for name, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][name], value), name
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
