"""Optimizer parameter groups and per-iteration learning-rate schedules shared by every task.

Schedules are plain multiplicative factors of the base learning rate, evaluated per optimizer
step, so one `LambdaLR` serves all recipes (cosine for ImageNet, step for COCO, poly for ADE20K)
and its state resumes exactly from a checkpoint.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn


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
) -> list[dict]:
    """Split trainable parameters into optimizer groups.

    No decay for 1-D tensors (biases, norm weights), for names a submodule lists in its
    `no_weight_decay()` (position embeddings, class token) and for `extra_no_decay`.
    `lr_mults` maps a parameter-name prefix to a learning-rate multiplier (first match wins),
    e.g. ``{"backbone.": 0.1}`` for DETR's slower backbone.
    """
    lr_mults = dict(lr_mults or {})
    skip = no_weight_decay_names(model) | set(extra_no_decay)
    groups: dict[tuple[float, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        mult = next((m for prefix, m in lr_mults.items() if name.startswith(prefix)), 1.0)
        decay = param.ndim > 1 and name not in skip
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
    fused: bool = True,
) -> torch.optim.Optimizer:
    """AdamW or SGD over `param_groups(model, ...)`.

    `fused`: one kernel updates every parameter (CPU and GPU). Off, the multi-tensor (foreach)
    path is used.
    """
    groups = param_groups(model, lr, weight_decay, lr_mults, no_weight_decay)
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
    """

    name: str = "cosine"  # cosine | step | poly | constant
    warmup_epochs: float = 0.0
    warmup_steps: int = 0
    warmup_factor: float = 1e-3  # lr at step 0, as a fraction of the base lr
    min_factor: float = 0.0  # floor of cosine and poly, as a fraction of the base lr
    milestones: tuple[float, ...] = ()  # epochs at which a step schedule multiplies by gamma
    gamma: float = 0.1
    power: float = 0.9


def lr_factor_fn(
    spec: ScheduleSpec, total_steps: int, steps_per_epoch: float
) -> Callable[[int], float]:
    """The multiplicative lr factor at each optimizer step (0-based)."""
    if spec.name not in {"cosine", "step", "poly", "constant"}:
        raise ValueError(
            f"scheduler.name={spec.name!r} is not supported; choose one of: cosine, step, poly, constant"
        )
    total = max(1, int(total_steps))
    warmup = max(int(spec.warmup_steps), round(spec.warmup_epochs * steps_per_epoch))
    warmup = min(warmup, total - 1) if total > 1 else 0
    milestones = sorted(round(m * steps_per_epoch) for m in spec.milestones)

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


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: ScheduleSpec, total_steps: int, steps_per_epoch: float
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_factor_fn(spec, total_steps, steps_per_epoch)
    )
