"""Printing, saving and checking composed configs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import rich
import rich.syntax
import rich.tree
from omegaconf import DictConfig, OmegaConf

# Groups shown first in the printed tree, in the order a reader wants them.
TREE_ORDER = ("task", "backbone", "head", "data", "trainer", "callbacks", "logger", "paths")


def print_config_tree(
    cfg: DictConfig, save_to: Path | None = None, order: Sequence[str] = TREE_ORDER
) -> None:
    """Print the resolved config as a tree; optionally write the same text to `save_to`."""
    tree = rich.tree.Tree("CONFIG", style="bold", guide_style="dim")
    keys = [k for k in order if k in cfg] + [k for k in cfg if k not in order]
    for key in keys:
        branch = tree.add(str(key), style="bold", guide_style="dim")
        node = cfg[key]
        text = OmegaConf.to_yaml(node, resolve=True) if isinstance(node, DictConfig) else str(node)
        branch.add(rich.syntax.Syntax(text, "yaml", theme="ansi_dark", background_color="default"))
    rich.print(tree)
    if save_to is not None:
        save_to.parent.mkdir(parents=True, exist_ok=True)
        with save_to.open("w") as handle:
            rich.print(tree, file=handle)


def save_resolved_config(cfg: DictConfig, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, path, resolve=True)


def config_without(cfg: DictConfig, keys: Sequence[str]) -> DictConfig:
    """A copy of `cfg` without `keys` (descriptive fields that are no constructor arguments)."""
    out = OmegaConf.masked_copy(cfg, [k for k in cfg if k not in keys])
    return out


class ConfigError(ValueError):
    """A config that composes but cannot run: incompatible choices, missing files."""


def check_compatible(cfg: DictConfig) -> None:
    """The task, head and data choices must agree on the kind of prediction."""
    kind = cfg.task.kind
    head_kind = cfg.get("head", {}).get("kind")
    data_kind = cfg.data.get("kind")
    if head_kind != kind:
        raise ConfigError(
            f"head={_choice(cfg, 'head')} is a {head_kind} head but task={kind}. "
            f"Heads for task={kind}: {', '.join(_heads_for(kind))}."
        )
    if data_kind != kind:
        raise ConfigError(
            f"data={_choice(cfg, 'data')} holds {data_kind} data but task={kind}. "
            "Data sets: shapes (every task), imagenet (classification), coco (detection), "
            "ade20k (segmentation)."
        )
    check_arguments(cfg)


def check_arguments(cfg: DictConfig) -> None:
    """Every key of a built node is an argument of its `_target_`, of an accepted type."""
    from pvtlab.utils.arguments import argument_problems  # imports the targets' modules

    problems = argument_problems(cfg)
    if problems:
        raise ConfigError(
            "the config does not fit the objects it builds:\n  " + "\n  ".join(problems)
        )


HEADS_BY_KIND = {
    "classification": ("linear",),
    "detection": ("retinanet", "mask_rcnn", "detr"),
    "segmentation": ("semantic_fpn", "trans2seg"),
}


def _heads_for(kind: str) -> tuple[str, ...]:
    return HEADS_BY_KIND.get(kind, ())


def _choice(cfg: DictConfig, group: str) -> str:
    """The name the user chose for a group, when Hydra recorded it."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return str(HydraConfig.get().runtime.choices.get(group, "?"))
    except ValueError:
        return str(cfg.get(group, {}).get("name", "?"))
