"""The pre-trained backbone weights a run names exist, checked before any data is read."""

from __future__ import annotations

from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pvtlab.config import ConfigError

__all__ = ["check_pretrained"]

_WEIGHTS_HINT = (
    "a classification run's <run>/backbone.pth, a released pvt_*.pth, a pvtlab .ckpt, a "
    ".safetensors file or a transformers PVT folder"
)


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
    if not Path(str(path)).exists():  # a file, or a transformers / timm folder
        raise ConfigError(
            f"backbone.pretrained={path}: no such file. Expected {_WEIGHTS_HINT}; "
            "backbone.pretrained=null (or ablation=scratch) trains from scratch."
        )
