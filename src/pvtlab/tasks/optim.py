"""Optimizer parameter groups and per-iteration learning-rate schedules shared by every task.

Schedules are plain multiplicative factors of the base learning rate, evaluated per optimizer
step, so one `LambdaLR` serves all recipes (cosine for ImageNet, stepped per epoch as the
release's timm scheduler; step for COCO; poly for ADE20K) and its state resumes exactly from a
checkpoint.

A recipe's schedule is fitted to a run of another length (`fit_schedule`), with one log line:
a warm-up takes at most half the run, and step milestones scale with the run when the schedule
names the length they were written for (`ScheduleSpec.epochs`); without it, milestones beyond
the run are named as never firing.

A run that would never change the weights (an lr of 0, every group's lr 0, a schedule at 0 on
every step, no optimizer step at all) is a `ConfigError` naming the key: `check_updates` before
anything is built, `build_optimizer` and `build_scheduler` for what only the model or the run's
length decides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from omegaconf import DictConfig
from torch import nn

from pvtlab.config import ConfigError

log = logging.getLogger(__name__)

# The largest share of a run that a warm-up may take; a longer one (a recipe's 5 epochs in a
# 1-epoch run) is clipped to it, so that the run also trains at the schedule's own rates.
WARMUP_LIMIT = 0.5
# Steps of a run at which `build_scheduler` looks for a non-zero lr (spread over the run).
LR_PROBES = 256


def check_updates(cfg: DictConfig) -> None:
    """A training run's config must update the weights: a positive `task.optimizer.lr` and at
    least one optimizer step (`trainer.max_steps`, `trainer.max_epochs`). No-op unless
    `train` is true."""
    if not cfg.get("train", False):
        return
    lr = ((cfg.get("task") or {}).get("optimizer") or {}).get("lr")
    if lr is not None and not float(lr) > 0:
        raise ConfigError(
            f"task.optimizer.lr={lr}: training with this learning rate never changes the "
            "weights. Set a positive task.optimizer.lr, or train=false to only evaluate."
        )
    trainer = cfg.get("trainer") or {}
    for key in ("max_steps", "max_epochs"):
        if trainer.get(key) == 0:
            raise ConfigError(
                f"trainer.{key}=0 with train=true: the run ends before its first optimizer "
                f"step. Set trainer.{key} to a positive value (-1 / null: no limit), or "
                "train=false to only evaluate."
            )


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Full parameter names a module tree asks to keep out of weight decay (timm convention)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        hook = getattr(module, "no_weight_decay", None)
        if callable(hook):
            names.update(f"{prefix}.{n}" if prefix else n for n in hook())
    return names


def param_groups(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    lr_mults: Mapping[str, float] | None = None,
    extra_no_decay: Iterable[str] = (),
    no_decay_1d: bool = True,
    no_decay_module_lists: bool = True,
) -> list[dict]:
    """Split trainable parameters into optimizer groups.

    No decay for 1-D tensors (biases, norm weights) with `no_decay_1d`, for names a submodule
    lists in its `no_weight_decay()` (PVT: position embeddings, class token) with
    `no_decay_module_lists`, and for the full parameter names in `extra_no_decay`.
    `lr_mults` maps a parameter-name prefix to a learning-rate multiplier (first match wins),
    e.g. ``{"backbone.": 0.1}`` for DETR's slower backbone.
    """
    lr_mults = dict(lr_mults or {})
    skip = set(extra_no_decay)
    if no_decay_module_lists:
        skip |= no_weight_decay_names(model)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        decay = not (no_decay_1d and param.ndim <= 1) and name not in skip
        key = (mult, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": lr * mult,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"lr{mult:g}_{'decay' if decay else 'no_decay'}",
            }
        groups[key]["params"].append(param)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    name: str = "adamw",
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    momentum: float = 0.9,
    lr_mults: Mapping[str, float] | None = None,
    no_weight_decay: Iterable[str] = (),
    no_weight_decay_1d: bool = True,
    no_weight_decay_module_lists: bool = True,
    fused: bool = True,
) -> torch.optim.Optimizer:
    """AdamW or SGD over `param_groups(model, ...)`.

    `no_weight_decay`, `no_weight_decay_1d` and `no_weight_decay_module_lists` choose the
    parameters without weight decay (`param_groups`' `extra_no_decay`, `no_decay_1d`,
    `no_decay_module_lists`). `fused`: one kernel updates every parameter (CPU and GPU). Off,
    the multi-tensor (foreach) path is used.
    """
    groups = param_groups(
        model,
        lr,
        weight_decay,
        lr_mults,
        no_weight_decay,
        no_decay_1d=no_weight_decay_1d,
        no_decay_module_lists=no_weight_decay_module_lists,
    )
    if not any(group["lr"] > 0 for group in groups):
        raise ConfigError(
            f"every parameter group's lr is 0 (optimizer.lr={lr}, optimizer.lr_mults="
            f"{dict(lr_mults or {})}): training would never change the weights. Set a positive "
            "task.optimizer.lr and at least one non-zero multiplier."
        )
    implementation = {"fused": True} if fused else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, **implementation)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, **implementation)
    raise ValueError(f"optimizer.name={name!r} is not supported; choose one of: adamw, sgd")


@dataclass(frozen=True)
class ScheduleSpec:
    """A learning-rate schedule in optimizer steps.

    Epoch-denominated settings (`warmup_epochs`, `milestones`) are converted with the number of
    steps per epoch; step-denominated ones (`warmup_steps`) are used as they are.

    `per_epoch`: the lr changes only at epoch boundaries, as timm's epoch-stepped schedulers
    (the release's ImageNet recipe): epoch e trains at the schedule's value for epoch
    e - `epoch_lag` (at least 0). The release calls `scheduler.step(epoch)` after each epoch,
    so epoch e trains at the value for e - 1: `epoch_lag: 1`. Its warm-up starts from the
    absolute `warmup_lr` (the lr at epoch 0) and rises linearly to the base lr over
    `warmup_epochs`; the cosine runs from the base lr at epoch 0 (not after warm-up) to the
    absolute floor `min_lr` at the last epoch. `warmup_lr` and `min_lr`, when set, replace
    `warmup_factor` and `min_factor` and hold whatever the base lr is (scaled by batch or not).
    """

    name: str = "cosine"  # cosine | step | poly | constant
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 1e-3  # lr at step 0, as a fraction of the base lr
    min_factor: float = 0.0  # floor of cosine and poly, as a fraction of the base lr
    milestones: tuple[float, ...] = ()  # epochs at which a step schedule multiplies by gamma
    gamma: float = 0.1
    power: float = 0.9
    per_epoch: bool = False
    epoch_lag: int = 0
    warmup_lr: float | None = None  # absolute lr at the start of warm-up (per_epoch cosine)
    min_lr: float | None = None  # absolute floor of the per_epoch cosine
    # The run length (epochs) the milestones were written for, the recipe's: a run of another
    # length scales them by its own length over this. None: they stay where they are.
    epochs: float | None = None


@dataclass(frozen=True)
class FittedSchedule:
    """A schedule's warm-up and milestones in optimizer steps of one run, and what changed."""

    warmup: int
    milestones: tuple[int, ...]
    changes: tuple[str, ...] = ()


def fit_schedule(spec: ScheduleSpec, total_steps: int, steps_per_epoch: float) -> FittedSchedule:
    """Warm-up and milestones of `spec` in steps of a run of `total_steps` (module docstring)."""
    total = max(1, int(total_steps))
    changes = []
    warmup = max(int(spec.warmup_steps), round(spec.warmup_epochs * steps_per_epoch))
    limit = int(WARMUP_LIMIT * total)
    if warmup > limit:
        changes.append(f"warm-up {warmup} -> {limit} steps (at most half the run)")
        warmup = limit
    milestones = tuple(float(m) for m in spec.milestones)
    run_epochs = total / steps_per_epoch if steps_per_epoch > 0 else 0.0
    if spec.name == "step" and milestones:
        scale = run_epochs / float(spec.epochs) if spec.epochs else 1.0
        if not math.isclose(scale, 1.0, rel_tol=1e-6):
            scaled = tuple(m * scale for m in milestones)
            changes.append(
                f"milestones at epochs {[round(m, 2) for m in milestones]} -> "
                f"{[round(m, 2) for m in scaled]} (x{scale:.3g}: a {run_epochs:.3g}-epoch run "
                f"of a {spec.epochs:g}-epoch schedule)"
            )
            milestones = scaled
        beyond = [round(m, 2) for m in milestones if m * steps_per_epoch >= total]
        if beyond:
            changes.append(
                f"milestones at epochs {beyond} lie beyond this {run_epochs:.3g}-epoch run and "
                "never fire (scheduler.epochs, the run length they were written for, scales them)"
            )
    steps = tuple(sorted(round(m * steps_per_epoch) for m in milestones))
    return FittedSchedule(warmup, steps, tuple(changes))


def lr_factor_fn(
    spec: ScheduleSpec, total_steps: int, steps_per_epoch: float
) -> Callable[[int], float]:
    """The multiplicative lr factor at each optimizer step (0-based), for a schedule that is not
    `per_epoch` (see `epoch_lr_fn` for that)."""
    if spec.name not in {"cosine", "step", "poly", "constant"}:
        raise ValueError(
            f"scheduler.name={spec.name!r} is not supported; choose one of: cosine, step, poly, constant"
        )
    total = max(1, int(total_steps))
    fitted = fit_schedule(spec, total, steps_per_epoch)
    warmup, milestones = fitted.warmup, fitted.milestones

    def main_factor(step: int) -> float:
        if spec.name == "cosine":
            progress = min(1.0, step / total)
            return spec.min_factor + (1 - spec.min_factor) * 0.5 * (
                1 + math.cos(math.pi * progress)
            )
        if spec.name == "poly":
            progress = min(1.0, step / total)
            return spec.min_factor + (1 - spec.min_factor) * (1 - progress) ** spec.power
        if spec.name == "step":
            return spec.gamma ** sum(step >= m for m in milestones)
        return 1.0

    def factor(step: int) -> float:
        value = main_factor(step)
        if step < warmup:
            # Linear ramp from warmup_factor to the schedule's own value at the end of warm-up.
            alpha = step / warmup
            value *= spec.warmup_factor + (1 - spec.warmup_factor) * alpha
        return value

    return factor


def epoch_lr_fn(
    spec: ScheduleSpec, total_epochs: int, steps_per_epoch: float
) -> Callable[[int, float], float]:
    """The lr at each optimizer step (0-based) of a `per_epoch` cosine, given the base lr:
    timm's `CosineLRScheduler` as the release's ImageNet loop steps it (see `ScheduleSpec`)."""
    if spec.name != "cosine":
        raise ValueError(f"per_epoch schedules support scheduler.name=cosine, not {spec.name!r}")
    epochs = max(1, int(total_epochs))
    warmup_epochs = min(int(spec.warmup_epochs), int(WARMUP_LIMIT * epochs))

    def lr_at(step: int, base_lr: float) -> float:
        warmup_lr = spec.warmup_lr if spec.warmup_lr is not None else spec.warmup_factor * base_lr
        min_lr = spec.min_lr if spec.min_lr is not None else spec.min_factor * base_lr
        epoch = max(0, int(step // steps_per_epoch) - spec.epoch_lag)
        if epoch < warmup_epochs:
            return warmup_lr + epoch * (base_lr - warmup_lr) / warmup_epochs
        progress = min(1.0, epoch / epochs)
        return min_lr + 0.5 * (base_lr - min_lr) * (1 + math.cos(math.pi * progress))

    return lr_at


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int, steps_per_epoch: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step `LambdaLR` of `spec` over a run of `total_steps`; one log line when the
    schedule is fitted to the run's length (`fit_schedule`)."""
    changes = fit_schedule(spec, total_steps, steps_per_epoch).changes
    if changes:
        log.warning("Schedule fitted to this run of %d steps: %s", total_steps, "; ".join(changes))
    if not spec.per_epoch:
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_factor_fn(spec, total_steps, steps_per_epoch)
        )
        _check_schedule_updates(scheduler, total_steps)
        return scheduler
    total_epochs = round(total_steps / steps_per_epoch) if steps_per_epoch else 1
    lr_at = epoch_lr_fn(spec, total_epochs, steps_per_epoch)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])

    def group_factor(group: dict) -> Callable[[int], float]:
        # Reads the group's base lr at each step, so that the absolute warm-up start and floor
        # hold after a later rescaling of the base lr (ClassificationTask's batch scaling).
        def factor(step: int) -> float:
            base = group["initial_lr"]
            return lr_at(step, base) / base if base else 0.0  # a frozen group stays at 0

        return factor

    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, [group_factor(group) for group in optimizer.param_groups]
    )
    _check_schedule_updates(scheduler, total_steps)
    return scheduler


def _check_schedule_updates(scheduler: torch.optim.lr_scheduler.LambdaLR, total_steps: int) -> None:
    """Raise a `ConfigError` when the schedule's lr is 0 for every group at every probed step
    (its first, the end of a warm-up, evenly spread ones), so the run would never train."""
    total = max(1, int(total_steps))
    probes = sorted({0, 1, total - 1, *range(0, total, max(1, total // LR_PROBES))})
    for base_lr, factor in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        if base_lr > 0 and any(factor(step) > 0 for step in probes if step < total):
            return
    raise ConfigError(
        f"the learning-rate schedule is 0 at every step of this {total}-step run (task.scheduler: "
        "warmup_lr, min_lr, warmup_factor, min_factor, gamma and milestones, with "
        "task.optimizer.lr): training would never change the weights."
    )
