"""Composed configs: checking them before anything is built, printing and saving them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import rich.syntax
import rich.tree
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from pvtlab.console import console

__all__ = [
    "ConfigError",
    "check_arguments",
    "check_compatible",
    "choices_summary",
    "head_kind",
    "print_config_tree",
    "save_resolved_config",
    "task_class",
    "task_kind",
]

# Groups shown first in the printed tree, in the order a reader wants them.
TREE_ORDER = ("task", "backbone", "head", "data", "trainer", "callbacks", "logger", "paths")
# The choices the one-line summary names (print_config=false), when chosen.
SUMMARY_GROUPS = (
    "task",
    "backbone",
    "head",
    "data",
    "trainer",
    "logger",
    "experiment",
    "ablation",
    "debug",
)

# The kind of prediction of each pvtlab head module; a head from elsewhere is not checked.
HEAD_KINDS = {
    "pvtlab.models.heads.linear": "classification",
    "pvtlab.models.heads.retinanet": "detection",
    "pvtlab.models.heads.mask_rcnn": "detection",
    "pvtlab.models.heads.detr": "detection",
    "pvtlab.models.heads.semantic_fpn": "segmentation",
    "pvtlab.models.heads.trans2seg": "segmentation",
}


class ConfigError(ValueError):
    """A config that composes but cannot run: incompatible choices, missing files."""


def print_config_tree(
    cfg: DictConfig,
    save_to: Path | None = None,
    order: Sequence[str] = TREE_ORDER,
    show: bool = True,
) -> None:
    """Print the resolved config as a tree (`show`); optionally write the same text to
    `save_to`, unwrapped."""
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    if show:
        console().print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as handle:
            Console(file=handle, soft_wrap=True, width=10_000).print(tree)


def choices_summary(cfg: DictConfig) -> str:
    """One line of what was chosen: task, network, data, trainer and the overlays, e.g.
    ``task=detection backbone=pvt_small head=retinanet data=coco trainer=ddp
    experiment=table3_retinanet``."""
    choices = _choices()
    if not choices:  # composed without Hydra's run facts: the targets stand in
        return " ".join(
            f"{group}={str(cfg[group].get('_target_', '?')).rpartition('.')[2]}"
            for group in SUMMARY_GROUPS
            if isinstance(cfg.get(group), DictConfig)
        )
    return " ".join(
        f"{group}={choices[group]}" for group in SUMMARY_GROUPS if choices.get(group) is not None
    )


def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def task_class(cfg: DictConfig) -> type[Any]:
    """The TaskModule class `cfg.task` builds; it knows its kind and its checkpoint metric."""
    try:
        return get_class(str(cfg.task._target_))
    except Exception as error:  # an import error of any kind
        raise ConfigError(
            f"task._target_={cfg.task._target_} cannot be imported ({error})"
        ) from None


def task_kind(cfg: DictConfig) -> str:
    """`classification`, `detection` or `segmentation`: the kind of prediction of `cfg.task`."""
    return str(task_class(cfg).kind)


def head_kind(head: DictConfig) -> str | None:
    """The kind of prediction of a pvtlab head config; None for a head from elsewhere."""
    module = str(head.get("_target_", "")).rpartition(".")[0]
    return HEAD_KINDS.get(module)


def check_compatible(cfg: DictConfig) -> None:
    """The task, head and data choices must agree on the kind of prediction, and every built
    node must fit its `_target_`'s arguments."""
    kind = task_kind(cfg)
    head = head_kind(cfg.head) if "head" in cfg else None
    if head is not None and head != kind:
        heads = sorted({m.rpartition(".")[2] for m, k in HEAD_KINDS.items() if k == kind})
        raise ConfigError(
            f"head={_choice(cfg, 'head')} is a {head} head but task={kind}. "
            f"Heads for task={kind}: {', '.join(heads)}."
        )
    data_kind = cfg.data.get("kind")
    if data_kind is not None and data_kind != kind:
        raise ConfigError(
            f"data={_choice(cfg, 'data')} holds {data_kind} data but task={kind}. "
            "Data sets: shapes (every task), imagenet (classification), coco (detection), "
            "ade20k (segmentation)."
        )
    check_arguments(cfg)


def check_arguments(cfg: DictConfig) -> None:
    """Every key of a built node is an argument of its `_target_`, of an accepted type."""
    from pvtlab.config.arguments import argument_problems  # imports the targets' modules

    problems = argument_problems(cfg)
    if problems:
        raise ConfigError(
            "the config does not fit the objects it builds:\n  " + "\n  ".join(problems)
        )


def _choices() -> dict[str, Any]:
    """The run's group choices, as Hydra recorded them; empty outside a Hydra run."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    return dict(HydraConfig.get().runtime.choices)


def _choice(cfg: DictConfig, group: str) -> str:
    """The name the user chose for a group, when Hydra recorded it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group, "?"))
    except ValueError:
        return str(cfg[group].get("_target_", "?"))
