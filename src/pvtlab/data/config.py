"""The config groups of a DataModule (`loader`, `splits`, `transforms`) as settings dataclasses.

Each group is a frozen dataclass beside the code it configures (`loading.LoaderConfig`,
`coco.CocoSplits`, `detection_transforms.DetectionTransformConfig`, ...), whose defaults fill
what a config leaves out. The data configs build them through `_target_`, so the config check
names a wrong key or type before a run; from Python a DataModule takes a plain mapping as well.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass, replace
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf

__all__ = ["as_config"]

ConfigT = TypeVar("ConfigT")


def as_config(value: ConfigT | Mapping[str, Any] | None, default: ConfigT, group: str) -> ConfigT:
    """`value` as a settings dataclass of `default`'s type.

    None gives `default`; a mapping (a plain dict or a Hydra node) replaces the fields of
    `default` it names. `group` (e.g. "data.loader") names the config key in the error for an
    unknown setting.
    """
    if value is None:
        return default
    if isinstance(value, type(default)):
        return value
    if isinstance(value, DictConfig):
        value = OmegaConf.to_container(value, resolve=True)
    if not isinstance(value, Mapping) or not is_dataclass(default):
        raise TypeError(f"{group} must be a mapping or a {type(default).__name__}, not {value!r}")
    known = [f.name for f in fields(default)]
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise TypeError(f"unknown {group} setting(s) {unknown}; valid ones: {known}")
    return replace(default, **value)
