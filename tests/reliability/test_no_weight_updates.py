"""A training run that would never change the weights is a config error naming the key."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from omegaconf import DictConfig
from torch import nn

from pvtlab import pipeline
from pvtlab.config import ConfigError
from pvtlab.tasks.optim import ScheduleSpec, build_optimizer, build_scheduler, check_updates


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("task.optimizer.lr=0", "task.optimizer.lr=0"),
        ("task.optimizer.lr=-1e-3", "task.optimizer.lr=-0.001"),
        ("trainer.max_steps=0", "trainer.max_steps=0"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0"),
    ],
)
def test_config_without_updates_is_refused(
    make_config: Callable[..., DictConfig], override: str, key: str
) -> None:
    cfg = make_config([override])
    with pytest.raises(ConfigError, match=re.escape(key)):
        check_updates(cfg)


def test_training_refuses_before_anything_is_built(
    make_config: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    def built(*args: object, **kwargs: object) -> None:
        raise AssertionError("the data module was built before the config was checked")

    monkeypatch.setattr(pipeline, "build_datamodule", built)
    with pytest.raises(ConfigError, match=re.escape("task.optimizer.lr=0")):
        pipeline.train(make_config(["task.optimizer.lr=0"]))


def test_evaluation_and_a_normal_run_pass(make_config: Callable[..., DictConfig]) -> None:
    check_updates(make_config(["train=false", "trainer.max_steps=0"]))
    check_updates(make_config())


def test_every_group_at_lr_0_is_refused() -> None:
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr_mults")):
        build_optimizer(Tiny(), lr=1e-3, lr_mults={"backbone.": 0.0, "head.": 0.0})
    # One frozen part is a choice, not an error.
    build_optimizer(Tiny(), lr=1e-3, lr_mults={"backbone.": 0.0})


def test_schedule_at_0_on_every_step_is_refused() -> None:
    optimizer = build_optimizer(Tiny(), lr=1e-3)
    spec = ScheduleSpec(name="step", milestones=(0,), gamma=0.0)  # x0 from the first step
    with pytest.raises(ConfigError, match=re.escape("task.scheduler")):
        build_scheduler(optimizer, spec, total_steps=100, steps_per_epoch=10)


def test_release_style_schedule_of_zeros_is_refused() -> None:
    # warmup_lr = lr = min_lr = 0: refused where the optimizer is built.
    with pytest.raises(ConfigError, match=re.escape("optimizer.lr=0")):
        build_optimizer(Tiny(), lr=0.0)


def test_per_epoch_schedule_with_a_frozen_group_builds() -> None:
    optimizer = build_optimizer(Tiny(), lr=1e-3, lr_mults={"backbone.": 0.0})
    spec = ScheduleSpec(name="cosine", per_epoch=True, warmup_epochs=1, warmup_lr=0.0, min_lr=0.0)
    scheduler = build_scheduler(optimizer, spec, total_steps=40, steps_per_epoch=10)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    lrs = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert all(lr == 0 for name, lr in lrs.items() if name.startswith("lr0_"))
    assert all(lr > 0 for name, lr in lrs.items() if not name.startswith("lr0_"))
