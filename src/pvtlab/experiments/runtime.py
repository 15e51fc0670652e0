"""Run-time pieces of an experiment, called by :mod:`pvtlab.pipeline` for every run."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from pvtlab.utils.config import ConfigError

__all__ = ["METRICS_FILE", "check_pretrained", "set_sweep_group", "sweep_group", "write_metrics"]

METRICS_FILE = "metrics.json"

_WEIGHTS_HINT = "a classification run's <run>/backbone.pth, a released pvt_*.pth or a pvtlab .ckpt"


def _choice(group: str) -> str | None:
    """The option chosen for `group` in this run, when Hydra set one up."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().runtime.choices.get(group)


def check_pretrained(cfg: DictConfig) -> None:
    """`backbone.pretrained` names an existing file, and `ablation=pretrained` has one at all."""
    path = cfg.backbone.get("pretrained")
    if path in (None, ""):
        if _choice("ablation") == "pretrained":
            raise ConfigError(
                "ablation=pretrained needs the pre-trained backbone weights: add "
                f"backbone.pretrained=<file> ({_WEIGHTS_HINT}); ablation=scratch trains without them."
            )
        return
    if not Path(str(path)).is_file():
        raise ConfigError(
            f"backbone.pretrained={path}: no such file. Expected {_WEIGHTS_HINT}; "
            "backbone.pretrained=null (or ablation=scratch) trains from scratch."
        )


def sweep_group(cfg: DictConfig) -> str | None:
    """The name shared by the jobs of one multirun: its sweep folder, relative to the log dir."""
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    sweep_dir = Path(str(HydraConfig.get().sweep.dir)).resolve()
    log_dir = Path(str(cfg.paths.log_dir)).resolve()
    parts = sweep_dir.relative_to(log_dir).parts if sweep_dir.is_relative_to(log_dir) else ()
    return "-".join(parts) if parts else sweep_dir.name


def set_sweep_group(cfg: DictConfig) -> None:
    """In a multirun, W&B runs are grouped by sweep unless `logger.wandb.group` is set."""
    wandb = (cfg.get("logger") or {}).get("wandb")
    if not wandb or wandb.get("group") is not None:
        return
    group = sweep_group(cfg)
    if group is not None:
        wandb.group = group


def write_metrics(metrics: Mapping[str, float], output_dir: Path) -> Path:
    """The run's final metrics as JSON (what multirun summaries and the collate script read)."""
    path = Path(output_dir) / METRICS_FILE
    clean = {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
