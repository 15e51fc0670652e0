"""Logger factories that need more than a `_target_`."""

from __future__ import annotations

import netrc
import os
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger


def wandb_account_configured() -> bool:
    """True when W&B can reach an account: an API key in the environment or in ~/.netrc."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def create_wandb_logger(
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: Sequence[str] = (),
    save_dir: str | Path = ".",
    offline: bool | None = None,
    log_model: bool = False,
    job_type: str | None = None,
    **kwargs,
) -> WandbLogger:
    """A WandbLogger that runs offline when no account is configured (or `offline=True`)."""
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not wandb_account_configured()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags),
        save_dir=str(save_dir),
        offline=offline,
        log_model=log_model and not offline,
        job_type=job_type,
        **kwargs,
    )
