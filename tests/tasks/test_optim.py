"""Parameter groups and per-step learning-rate schedules."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pvtlab.pipeline import validation_schedule
from pvtlab.tasks.base import TaskModule
from pvtlab.tasks.optim import (
    ScheduleSpec,
    build_optimizer,
    fit_schedule,
    lr_factor_fn,
    param_groups,
)


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(4, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def _group_names(groups: list[dict], model: nn.Module) -> dict[str, set[str]]:
    ids = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: {ids[id(p)] for p in g["params"]} for g in groups}


def test_no_decay_for_1d_and_listed_parameters() -> None:
    model = Tiny()
    groups = _group_names(param_groups(model, lr=1.0, weight_decay=0.05), model)
    assert groups["lr1_decay"] == {"backbone.weight", "head.weight"}
    assert groups["lr1_no_decay"] == {
        "backbone.bias",
        "pos_embed",
        "norm.weight",
        "norm.bias",
        "head.bias",
    }


def test_lr_multiplier_by_prefix() -> None:
    model = Tiny()
    groups = param_groups(model, lr=1e-4, weight_decay=1e-4, lr_mults={"backbone.": 0.1})
    by_name = {g["name"]: g for g in groups}
    assert by_name["lr0.1_decay"]["lr"] == pytest.approx(1e-5)
    assert by_name["lr1_decay"]["lr"] == pytest.approx(1e-4)
    assert by_name["lr0.1_no_decay"]["weight_decay"] == 0.0


def test_frozen_parameters_are_left_out() -> None:
    model = Tiny()
    model.head.requires_grad_(False)
    params = {id(p) for g in param_groups(model, 1.0, 0.1) for p in g["params"]}
    assert id(model.head.weight) not in params
    assert id(model.backbone.weight) in params


def test_cosine_with_warmup_matches_the_deit_recipe() -> None:
    # 10 epochs of 100 steps, 2 warm-up epochs from 1e-6 to 1e-3, floor 1e-5 (factors of 1e-3).
    spec = ScheduleSpec(name="cosine", warmup_epochs=2, warmup_factor=1e-3, min_factor=1e-2)
    factor = lr_factor_fn(spec, total_steps=1000, steps_per_epoch=100)
    assert factor(0) == pytest.approx(1e-3 * (0.01 + 0.99 * 1.0), rel=1e-6)
    # After warm-up the factor is the plain cosine.
    expected = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 500 / 1000))
    assert factor(500) == pytest.approx(expected)
    assert factor(999) == pytest.approx(0.01, abs=1e-4)
    ramp = [factor(s) for s in range(0, 200, 20)]
    assert ramp == sorted(ramp)


def test_step_schedule_drops_at_epoch_milestones_after_iteration_warmup() -> None:
    # mmdetection 1x: 12 epochs, x0.1 at 8 and 11, 500-iteration linear warm-up from 0.001.
    spec = ScheduleSpec(name="step", warmup_steps=500, warmup_factor=1e-3, milestones=(8, 11))
    factor = lr_factor_fn(spec, total_steps=1200, steps_per_epoch=100)
    assert factor(0) == pytest.approx(1e-3)
    assert factor(250) == pytest.approx(1e-3 + (1 - 1e-3) * 0.5)
    assert factor(799) == pytest.approx(1.0)
    assert factor(800) == pytest.approx(0.1)
    assert factor(1100) == pytest.approx(0.01)


def test_poly_schedule() -> None:
    factor = lr_factor_fn(ScheduleSpec(name="poly", power=0.9), total_steps=80, steps_per_epoch=80)
    assert factor(0) == pytest.approx(1.0)
    assert factor(40) == pytest.approx(0.5**0.9)
    assert factor(80) == pytest.approx(0.0)


def test_unknown_names_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="choose one of: cosine, step, poly, constant"):
        lr_factor_fn(ScheduleSpec(name="linear"), 10, 10)
    with pytest.raises(ValueError, match="choose one of: adamw, sgd"):
        build_optimizer(Tiny(), name="lamb")


def test_adamw_carries_group_settings() -> None:
    optimizer = build_optimizer(Tiny(), lr=1e-3, weight_decay=0.05, betas=[0.9, 0.95])
    assert isinstance(optimizer, torch.optim.AdamW)
    assert {g["weight_decay"] for g in optimizer.param_groups} == {0.0, 0.05}
    assert optimizer.defaults["betas"] == (0.9, 0.95)


def _stepped(fused: bool, steps: int = 3) -> tuple[torch.optim.Optimizer, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = Tiny()
    optimizer = build_optimizer(model, lr=1e-2, weight_decay=0.05, fused=fused)
    for _ in range(steps):
        optimizer.zero_grad()
        model.head(
            model.norm(model.backbone(torch.randn(8, 3, 4)) + model.pos_embed)
        ).sum().backward()
        optimizer.step()
    return optimizer, [p.detach().clone() for p in model.parameters()]


def test_fused_update_is_the_multi_tensor_update() -> None:
    fused, fused_params = _stepped(fused=True)
    foreach, foreach_params = _stepped(fused=False)
    assert fused.defaults["fused"] is True and foreach.defaults["foreach"] is True
    for a, b in zip(fused_params, foreach_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Regression(TaskModule):
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.model.head(self.model.backbone(x)), y)


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
@pytest.mark.parametrize("clip", [0.01, None])
def test_gradients_clip_with_the_fused_optimizer_in_fp32_and_bf16(
    precision: str, clip: float | None
) -> None:
    """Lightning refuses to clip a fused optimizer's gradients under any mixed precision (for
    fp16's scaler); under bf16, as in fp32, pvtlab clips them and keeps the fused step."""
    data = TensorDataset(torch.randn(16, 4), 10 * torch.randn(16, 2))
    module = _Regression(Tiny(), optimizer={"lr": 1e-3}, scheduler={"name": "constant"})
    trainer = L.Trainer(
        max_steps=2,
        precision=precision,
        gradient_clip_val=clip,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True
    # The last step's gradients, as the optimizer used them.
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    norm = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    if clip is None:
        assert norm > 0.01  # so that the clipped runs' bound is a real one
    else:
        assert norm == pytest.approx(clip, rel=1e-3)


# ------------------------------------------------------------------ runs of any length


def test_a_warmup_longer_than_half_the_run_is_clipped() -> None:
    # DeiT's 5 warm-up epochs in a 1-epoch run of 10 steps: 5 steps of warm-up, then the cosine.
    spec = ScheduleSpec(name="cosine", warmup_epochs=5, warmup_factor=1e-3)
    fitted = fit_schedule(spec, total_steps=10, steps_per_epoch=10)
    assert fitted.warmup == 5
    assert fitted.changes == ("warm-up 50 -> 5 steps (at most half the run)",)
    factor = lr_factor_fn(spec, total_steps=10, steps_per_epoch=10)
    assert factor(0) == pytest.approx(1e-3)
    assert factor(5) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.5)))
    # COCO's 500 iterations in a 40-step run.
    coco = ScheduleSpec(name="step", warmup_steps=500, milestones=(8, 11), epochs=12)
    assert fit_schedule(coco, total_steps=40, steps_per_epoch=10).warmup == 20


def test_milestones_scale_with_the_run_they_were_written_for() -> None:
    # mmdetection 1x (drops after epochs 8 and 11 of 12) in a 4-epoch run: drops at 8/3, 11/3.
    spec = ScheduleSpec(name="step", milestones=(8, 11), epochs=12)
    fitted = fit_schedule(spec, total_steps=400, steps_per_epoch=100)
    assert fitted.milestones == (267, 367)
    assert "milestones at epochs [8.0, 11.0] -> [2.67, 3.67]" in fitted.changes[0]
    factor = lr_factor_fn(spec, total_steps=400, steps_per_epoch=100)
    assert factor(266) == 1.0 and factor(267) == pytest.approx(0.1)
    assert factor(399) == pytest.approx(0.01)
    # The recipe's own length changes nothing.
    assert fit_schedule(spec, total_steps=1200, steps_per_epoch=100).changes == ()
    # Without the schedule's length, milestones beyond the run are named as never firing.
    unscaled = fit_schedule(ScheduleSpec(name="step", milestones=(8, 11)), 400, 100)
    assert unscaled.milestones == (800, 1100)
    assert "milestones at epochs [8.0, 11.0] lie beyond this 4-epoch run" in unscaled.changes[0]


class _Validated(_Regression):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.validations = 0
        self.lrs: list[float] = []

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.validations += 1


def test_a_one_epoch_run_with_a_longer_warmup_logs_the_clipped_schedule_and_validates(
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = TensorDataset(torch.randn(16, 4), torch.randn(16, 2))
    module = _Validated(
        Tiny(),
        optimizer={"lr": 1e-3},
        scheduler={"name": "cosine", "warmup_epochs": 5, "warmup_factor": 1e-3},
    )
    trainer = L.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(data, batch_size=4)
    with caplog.at_level("WARNING", logger="pvtlab.tasks.optim"):
        trainer.fit(module, loader, loader)
    lines = [r.getMessage() for r in caplog.records if "Schedule fitted" in r.getMessage()]
    assert lines == [
        "Schedule fitted to this run of 4 steps: warm-up 20 -> 2 steps (at most half the run)"
    ]
    assert module.validations == 4
    # Half the run warms up, the rest follows the cosine: step 2 trains at its value.
    assert module.lrs[0] == pytest.approx(1e-6)
    assert module.lrs[2] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 2 / 4)))


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        # ADE20K's 4000-iteration interval in a 1000-step run: validate at its end.
        (
            {"max_steps": 1000, "val_check_interval": 4000, "check_val_every_n_epoch": None},
            {"val_check_interval": 1000},
        ),
        # 5000 steps: twice, at 2500 and at the end (not at 4000 only).
        (
            {"max_steps": 5000, "val_check_interval": 4000, "check_val_every_n_epoch": None},
            {"val_check_interval": 2500},
        ),
        # The recipe's own length: unchanged.
        ({"max_steps": 80000, "val_check_interval": 4000, "check_val_every_n_epoch": None}, {}),
        # Every 8 epochs in a 5-epoch run: at its end.
        (
            {"max_steps": -1, "max_epochs": 5, "check_val_every_n_epoch": 8},
            {"check_val_every_n_epoch": 5},
        ),
        ({"max_steps": -1, "max_epochs": 12, "check_val_every_n_epoch": 1}, {}),
    ],
)
def test_every_run_validates_at_its_end(trainer: dict, expected: dict) -> None:
    assert validation_schedule(trainer) == expected
