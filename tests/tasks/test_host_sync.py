"""The classification and segmentation training steps read nothing back to the host.

Reading a tensor's value in Python (``.item()``, ``.tolist()``, ``bool(t)``, ...) makes the
host wait for the accelerator on every step. Here every such read raises while a step's
forward, loss and backward run, so any that creeps in fails the test on a CPU-only machine.
(The detectors' steps read back by design: torchvision's samplers and DETR's Hungarian matching
run on the host.)"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from pvtlab.pipeline import build_task
from tests.conftest import compose_config

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__")


@contextmanager
def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(name: str) -> Any:
        def read(*args: Any, **kwargs: Any) -> None:
            raise AssertionError(f"Tensor.{name} read a value back to the host in a training step")

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, refuse(name))
        yield


def _train_step(task: Any, batch: Any) -> None:
    task.log = lambda *args, **kwargs: None  # Lightning's logging is outside the step's own work
    loss = task.training_step(batch, 0)
    loss.backward()


def test_the_guard_catches_a_read(monkeypatch: pytest.MonkeyPatch) -> None:
    with forbid_host_reads(monkeypatch), pytest.raises(AssertionError, match=r"Tensor\.item"):
        torch.ones(()).item()
    assert torch.ones(()).item() == 1.0  # restored afterwards


@pytest.mark.parametrize("mixup", [True, False])
def test_classification_step(monkeypatch: pytest.MonkeyPatch, mixup: bool) -> None:
    overrides = ["backbone=pvt_tiny"]  # the shapes recipe: 64 px, mixup and cutmix off
    if mixup:  # the ImageNet recipe's
        overrides += ["task.mixup.mixup_alpha=0.8", "task.mixup.cutmix_alpha=1.0"]
    task = build_task(compose_config(overrides)).train()
    assert (task.mixup is not None) is mixup
    batch = (torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3]))
    with forbid_host_reads(monkeypatch):
        _train_step(task, batch)
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


@pytest.mark.parametrize("head", ["semantic_fpn", "trans2seg"])
def test_segmentation_step(monkeypatch: pytest.MonkeyPatch, head: str) -> None:
    task = build_task(compose_config(["task=segmentation", f"head={head}"])).train()
    labels = torch.randint(0, 8, (2, 64, 64))
    labels[:, :8] = 255  # ignored pixels
    batch = {"image": torch.randn(2, 3, 64, 64), "label": labels}
    with forbid_host_reads(monkeypatch):
        _train_step(task, batch)
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)
