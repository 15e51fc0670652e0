"""A disk that fills up while a checkpoint is written: one clear error naming the file and the
free space, the previous checkpoint whole and loadable, no temporary file left."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch

from pvtlab.callbacks.checkpointing import AtomicCheckpointIO, CheckpointWriteError

# How the write fails: the OS's "no space left", or torch's zip writer reporting a failed write
# (what a full disk gives when torch.save writes to a file name).
FAILURES = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "torch writer": RuntimeError(
        "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file "
        "data/0: file write failed"
    ),
}


@pytest.mark.parametrize("failure", FAILURES, ids=list(FAILURES))
def test_a_full_disk_mid_write_names_the_file_and_keeps_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str
) -> None:
    path = tmp_path / "checkpoints" / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"step": 1, "w": torch.ones(1000)}, path)
    real_save = torch.save

    def fills_the_disk(obj: object, handle, *args: object, **kwargs: object) -> None:
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(100)  # part of the file reached the disk, then no more room
        raise FAILURES[failure]

    monkeypatch.setattr(torch, "save", fills_the_disk)
    with pytest.raises(CheckpointWriteError) as error:
        AtomicCheckpointIO().save_checkpoint({"step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()

    message = str(error.value)
    assert str(path) in message and "disk is full" in message and "MiB free" in message
    assert "previous last.ckpt is kept" in message
    kept = torch.load(path, weights_only=True)
    assert kept["step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert [p.name for p in path.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_other_write_errors_are_not_taken_for_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(obj: object, handle, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(torch, "save", refused)
    with pytest.raises(PermissionError):
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
