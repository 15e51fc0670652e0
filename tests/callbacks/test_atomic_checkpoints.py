"""A checkpoint write that fails or is killed half-way leaves the previous file whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from pvtlab.callbacks.checkpointing import AtomicCheckpointIO
from pvtlab.pipeline import build_trainer
from tests.conftest import REPO


def test_failure_mid_write_keeps_the_old_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def torn_save(obj: object, handle: object, *args: object, **kwargs: object) -> None:
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(100)  # half a file, then the process "dies"
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


WRITER = """
import sys, torch
from pvtlab.callbacks.checkpointing import atomic_torch_save
path, i = sys.argv[1], 0
while True:
    i += 1
    atomic_torch_save({"step": i, "w": torch.full((2_000_000,), float(i))}, path)
    print(i, flush=True)
"""


def test_sigkill_while_saving_never_leaves_a_torn_file(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    process = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        for _ in range(3):  # a few saves done, then kill at an arbitrary point of the next
            assert process.stdout.readline(), "the writer died"
        time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["step"] >= 3
    assert torch.equal(checkpoint["w"], torch.full((2_000_000,), float(checkpoint["step"])))


def test_trainers_write_checkpoints_atomically(make_config: Callable[..., DictConfig]) -> None:
    for trainer in ("cpu", "ddp_cpu"):
        built = build_trainer(make_config([f"trainer={trainer}"]))
        assert isinstance(built.strategy.checkpoint_io, AtomicCheckpointIO), trainer


def test_step_checkpoints_are_written_by_default(make_config: Callable[..., DictConfig]) -> None:
    cfg = make_config([])
    assert cfg.callbacks.step_checkpoint.every_n_train_steps == 1000
    assert (
        os.fspath(cfg.callbacks.step_checkpoint.dirpath) == cfg.callbacks.model_checkpoint.dirpath
    )
