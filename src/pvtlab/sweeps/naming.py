"""Names of a multirun's jobs in W&B: one group per sweep, one run name per job."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

__all__ = ["job_run_name", "set_sweep_group", "sweep_group"]


def _in_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def sweep_group(cfg: DictConfig) -> str | None:
    """The name shared by the jobs of one multirun: its sweep folder, relative to the log dir."""
    if not _in_multirun():
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


def job_run_name(name: str | None) -> str | None:
    """In a multirun, each job's own run name: `<name>-<job num> (<overrides>)`; else `name`."""
    if not _in_multirun():
        return name
    job = HydraConfig.get().job
    suffix = f"{job.num}" + (f" ({job.override_dirname})" if job.get("override_dirname") else "")
    return f"{name}-{suffix}" if name else suffix
