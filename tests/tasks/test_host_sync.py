"""The classification, segmentation and RetinaNet training steps read nothing back to the host,
DETR's step reads once, and the training loop reads the loss back once a log interval.

Reading a tensor's value in Python (``.item()``, ``.tolist()``, ``bool(t)``, ...) makes the
host wait for the accelerator on every step, and so does every operation whose output size
depends on the values (``nonzero``, boolean-mask indexing, ``unique``, ...): the host must learn
the size before it can go on. Here every such read or operation raises (or is counted) while a
step's forward, loss and backward run, so any that creeps in fails the test on a CPU-only
machine. (Mask R-CNN reads back by design: torchvision's samplers and proposal NMS run on the
host. DETR's Hungarian matching does too, with one copy of every decoder layer's costs.)"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pvtlab.pipeline import build_task
from tests.conftest import compose_config
from tests.host_sync import DeviceWaits, forbid_host_reads, intercept_host_reads


def test_device_waits_sees_value_sized_operators() -> None:
    values = torch.tensor([0.0, 2.0, -1.0])
    with DeviceWaits() as waits:
        values[values > 0] = 0.0
        values.nonzero()
        torch.where(values > 0, values, 1.0)  # fixed size: no wait
        values.clamp(min=0).sum()
    assert waits.calls == {"aten.index_put_ with a boolean mask": 1, "aten.nonzero": 1}
    assert waits.total == 2


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


def test_retinanet_step(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's assignment and losses make the host wait up to 11 times an image; pvtlab's
    (`pvtlab.models.heads.retinanet_loss`) not at all. The boxes' area check reads them only on
    the CPU: it runs here on a value-less copy, as it would on an accelerator."""
    from pvtlab.models.heads import retinanet

    check = retinanet.check_target_boxes
    monkeypatch.setattr(
        retinanet, "check_target_boxes", lambda boxes, index: check(boxes.to("meta"), index)
    )
    task = build_task(compose_config(["task=detection", "head=retinanet"])).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 60.0, 50.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)},
    ]  # fmt: skip
    with forbid_host_reads(monkeypatch):
        _train_step(task, (images, targets))
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_detr_step_reads_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every decoder layer's matching costs come back in one copy; nothing else is read."""
    task = build_task(compose_config(["task=detection", "head=detr"])).train()
    assert task.model.aux_loss and len(task.model.transformer.decoder) > 1
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 64)]
    targets = [
        {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0], [20.0, 10.0, 60.0, 50.0]]),
         "labels": torch.tensor([1, 3])},
        {"boxes": torch.tensor([[10.0, 12.0, 40.0, 44.0]]), "labels": torch.tensor([0])},
    ]  # fmt: skip
    reads: Counter[str] = Counter()
    with (
        intercept_host_reads(monkeypatch, lambda name: reads.update([name])),
        DeviceWaits() as waits,
    ):
        _train_step(task, (images, targets))
    # `.numpy()` only views the host copy, for scipy's assignment of each layer and image.
    assert reads.pop("cpu") == 1 and set(reads) <= {"numpy"}
    assert not waits.calls, waits.calls  # the losses: no boolean masks (torchvision's GIoU has)
    assert all(p.grad is not None for p in task.model.parameters() if p.requires_grad)


def test_the_training_loop_reads_the_loss_back_every_log_interval(
    monkeypatch: pytest.MonkeyPatch, make_config: Callable[..., Any]
) -> None:
    """With the default callbacks and logger, the loss comes back to the host for the progress
    bar and the log every `log_every_n_steps` batches, not after each one (as Lightning reads
    every value logged with ``prog_bar=True``)."""
    from hydra.utils import instantiate

    from pvtlab.callbacks.progress import PeriodicLossProgressBar
    from pvtlab.pipeline import build_trainer

    steps = 24
    cfg = make_config(
        [
            "data.generator.train_images=192",  # one epoch of 24 batches
            "data.loader.batch_size=8",
            "data.loader.num_workers=0",
            f"trainer.max_steps={steps}",
            "trainer.max_epochs=-1",
            "trainer.log_every_n_steps=12",
            "trainer.limit_val_batches=0",
            "trainer.num_sanity_val_steps=0",
            "+trainer.enable_checkpointing=false",
            "~callbacks.model_checkpoint",
            "~callbacks.step_checkpoint",
        ]
    )
    trainer, task = build_trainer(cfg), build_task(cfg)
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()  # the shapes files, before any read is counted
    reads: Counter[str] = Counter()
    # `item` and `__float__`: the loss's reads (the guard's `bool` and the transforms' are not).
    counted = {"item", "__float__"}
    with intercept_host_reads(monkeypatch, lambda name: reads.update({name} & counted)):
        trainer.fit(task, datamodule=datamodule)
    assert trainer.global_step == steps
    # At 1, 12, 24 and the epoch's end; Lightning's own bar reads twice or more every step.
    assert 0 < sum(reads.values()) < steps, reads
    bar = next(c for c in trainer.callbacks if isinstance(c, PeriodicLossProgressBar))
    shown = bar.get_metrics(trainer, task)
    assert {"train/loss_step", "train/loss_epoch"} <= shown.keys(), shown


def test_the_progress_bar_refuses_a_zero_interval() -> None:
    from pvtlab.callbacks.progress import PeriodicLossProgressBar

    with pytest.raises(ValueError, match="every_n_steps"):
        PeriodicLossProgressBar(every_n_steps=0)
