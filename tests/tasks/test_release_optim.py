"""The release's weight-decay groups and its epoch-stepped ImageNet cosine."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from pvtlab.tasks.optim import ScheduleSpec, build_optimizer, build_scheduler, param_groups


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed1 = nn.Parameter(torch.zeros(1, 9, 4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed1"}


def _decayed(groups: list[dict], model: nn.Module) -> set[str]:
    ids = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_imagenet_groups_leave_out_1d_parameters_and_the_class_token_only() -> None:
    """The release's timm optimizer: no decay for 1-D tensors and `cls_token` (its PVT's
    no_weight_decay()); the position embeddings decay."""
    model = _Model()
    groups = param_groups(
        model, 1e-3, 0.05, extra_no_decay=["cls_token"], no_decay_module_lists=False
    )
    assert _decayed(groups, model) == {"pos_embed1", "proj.weight"}


def test_dense_groups_decay_every_parameter() -> None:
    """mmdetection / mmsegmentation without parameter-wise settings decay everything."""
    model = _Model()
    optimizer = build_optimizer(
        model,
        lr=1e-4,
        weight_decay=1e-4,
        no_weight_decay_1d=False,
        no_weight_decay_module_lists=False,
    )
    assert len(optimizer.param_groups) == 1
    assert optimizer.param_groups[0]["weight_decay"] == 1e-4
    assert _decayed(optimizer.param_groups, model) == {n for n, _ in model.named_parameters()}


def test_default_groups_keep_the_transformer_convention() -> None:
    model = _Model()
    assert _decayed(param_groups(model, 1e-3, 0.05), model) == {"proj.weight"}


def _timm_cosine(
    epoch: int, base: float, epochs: int, warmup: int, warmup_lr: float, min_lr: float
):
    """timm 0.3's CosineLRScheduler value at epoch t (warm-up not prefixed, one cycle)."""
    if epoch < warmup:
        return warmup_lr + epoch * (base - warmup_lr) / warmup
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * epoch / epochs))


@pytest.mark.parametrize("base_lr", [1e-3, 5e-4])
def test_imagenet_cosine_steps_per_epoch_from_absolute_bounds(base_lr: float) -> None:
    """10 epochs of 4 steps: constant within an epoch; epoch e at timm's value for e - 1 (the
    release's loop steps the scheduler after each epoch); warm-up from 1e-6 and floor 1e-5
    whatever the base lr, the first step included."""
    spec = ScheduleSpec(
        name="cosine", per_epoch=True, epoch_lag=1, warmup_epochs=3, warmup_lr=1e-6, min_lr=1e-5
    )
    parameter = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=base_lr)
    scheduler = build_scheduler(optimizer, spec, total_steps=40, steps_per_epoch=4)
    lrs = [optimizer.param_groups[0]["lr"]]  # the lr each step 0..39 trains at
    for _ in range(39):
        optimizer.step()
        scheduler.step()
        lrs.append(optimizer.param_groups[0]["lr"])
    for step in range(40):
        epoch = step // 4
        expected = _timm_cosine(max(epoch - 1, 0), base_lr, 10, 3, 1e-6, 1e-5)
        assert lrs[step] == pytest.approx(expected, rel=1e-9), step
    assert lrs[4] == pytest.approx(1e-6)  # epoch 1 still at the warm-up start
    assert len({round(lr, 15) for lr in lrs[4:8]}) == 1


def test_per_epoch_schedules_are_cosine_only() -> None:
    with pytest.raises(ValueError, match="cosine"):
        optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
        build_scheduler(optimizer, ScheduleSpec(name="poly", per_epoch=True), 10, 2)
