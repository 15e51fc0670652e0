"""The config a checkpoint was trained with, and the user's overrides on top.

A pvtlab checkpoint carries its network (`hyper_parameters['model_config']`) and, since this
module exists, the task and data groups of its run (`hyper_parameters['run_config']`), resolved
to plain values. `src/eval.py ckpt_path=<file>` evaluates with those groups, then every
command-line override on top (`data.root=...`, `split=test`, `compile=true`; a group choice such
as `data=coco` replaces the checkpoint's group wholesale). The release's `pvt_*.pth` and a
transformers PVT folder are ImageNet classifiers: evaluated as `task=classification` around the
file's backbone (`backbone.pretrained=<file>`).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, OmegaConf, open_dict

from pvtlab.config import ConfigError, head_kind, task_kind

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config"  # the key of `hyper_parameters` holding the run's task and data
# Blocks per stage of each PVT the release published (docs/paper.md section 1).
RELEASE_PVTS = {
    (2, 2, 2, 2): "pvt_tiny",
    (3, 4, 6, 3): "pvt_small",
    (3, 4, 18, 3): "pvt_medium",
    (3, 8, 27, 3): "pvt_large",
}
TRANSFORMERS_CONFIG = "config.json"


def run_config(cfg: DictConfig) -> dict[str, Any]:
    """What a checkpoint records of its run beside its network: the `task` and `data` groups
    (plain, resolved values: checkpoints load with weights_only=True)."""
    return {
        "task": OmegaConf.to_container(cfg.task, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
    }


def read_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """A checkpoint file loaded without running pickled code; a file that is none is one
    ConfigError naming it."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        # torch's message advises weights_only=False, i.e. running the file's code: not ours.
        lines = [line.strip() for line in str(error).splitlines()]
        reason = next((line for line in lines if line.startswith("WeightsUnpickler")), lines[0])
        reason = reason.removeprefix("WeightsUnpickler error: ").split(". Please")[0]
        raise ConfigError(
            f"{path} is not a pvtlab checkpoint: it holds Python objects other than tensors and "
            f"plain values ({reason}); pvtlab reads checkpoints without running their code"
        ) from None
    except Exception as error:  # torch raises several unrelated types for a foreign file
        raise ConfigError(
            f"{path} is not a loadable checkpoint ({type(error).__name__}: {error})"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ConfigError(
            f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dictionary"
        )
    return checkpoint


@dataclass(frozen=True)
class CheckpointSource:
    """What `ckpt_path` names, as evaluation sees it.

    `format`: `pvtlab` (a run's .ckpt), `release_model` (the release's mmdetection /
    mmsegmentation whole model: built from the composed config), `backbone` (the release's
    `pvt_*.pth` or a transformers folder: an ImageNet classifier). `kind`: the task kind it
    predicts, None where only the config says. `backbone`: the timm name of a `backbone` file.
    """

    path: Path
    format: str
    kind: str | None = None
    model_config: Mapping[str, Any] | None = None
    run_config: Mapping[str, Any] | None = None
    backbone: str | None = None


def is_transformers_folder(path: str | Path) -> bool:
    return Path(path).is_dir() and (Path(path) / TRANSFORMERS_CONFIG).is_file()


def read_source(path: str | Path, mmap: bool = False) -> CheckpointSource:
    """Describe the checkpoint `path` (a file, or a transformers folder)."""
    path = Path(path)
    if is_transformers_folder(path):
        import json

        depths = tuple(json.loads((path / TRANSFORMERS_CONFIG).read_text()).get("depths") or ())
        return CheckpointSource(
            path, "backbone", "classification", backbone=_pvt_name(depths, path)
        )
    checkpoint = read_checkpoint(path, mmap=mmap)
    hyper_parameters = checkpoint.get("hyper_parameters") or {}
    description = hyper_parameters.get("model_config")
    if description:
        return CheckpointSource(
            path,
            "pvtlab",
            head_kind(OmegaConf.create(description["head"])),
            description,
            hyper_parameters.get(RUN_CONFIG),
        )
    state = _tensors(checkpoint)
    if "patch_embed1.proj.weight" in state:  # the release's flat PVT layout
        blocks = {tuple(k.split(".", 2)[:2]) for k in state if k.startswith("block")}
        depths = tuple(sum(1 for b, _ in blocks if b == f"block{s}") for s in range(1, 5))
        return CheckpointSource(
            path, "backbone", "classification", backbone=_pvt_name(depths, path)
        )
    return CheckpointSource(path, "release_model" if "state_dict" in checkpoint else "unknown")


def _tensors(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    for key in ("state_dict", "model"):
        if isinstance(checkpoint.get(key), Mapping):
            return checkpoint[key]
    return checkpoint


def _pvt_name(depths: tuple[int, ...], path: Path) -> str:
    if depths not in RELEASE_PVTS:
        raise ConfigError(
            f"{path}: a PVT with {list(depths)} blocks per stage is none of the released "
            f"models ({', '.join(f'{n}: {list(d)}' for d, n in RELEASE_PVTS.items())})"
        )
    return RELEASE_PVTS[depths]


def checkpoint_task(ckpt_path: str | None, fallback: str) -> str:
    """The task kind of `ckpt_path`, read cheaply (memory-mapped): the folder name of an
    evaluation (`hydra.run.dir`). `fallback` (the chosen task) where the file says nothing or
    cannot be read; evaluation itself reports why."""
    if not ckpt_path or ckpt_path == "last":
        return fallback
    try:
        return read_source(ckpt_path, mmap=True).kind or fallback
    except Exception:  # any failure: evaluate itself reports it, clearly
        return fallback


def register_resolver() -> None:
    """`${pvtlab_checkpoint_task:<ckpt_path>,<fallback>}` in configs (conf/hydra/eval.yaml)."""
    if not OmegaConf.has_resolver("pvtlab_checkpoint_task"):
        OmegaConf.register_new_resolver("pvtlab_checkpoint_task", checkpoint_task)


def user_overrides() -> list[str]:
    """The command line's overrides (Hydra's `overrides.task`); none outside a Hydra run."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def eval_config(cfg: DictConfig, source: CheckpointSource) -> DictConfig:
    """The config evaluating `source` runs with: the checkpoint's task, backbone, head and data
    groups, then every command-line override on top (read back from the composed `cfg`, where
    Hydra already parsed it). A `task=` choice of another kind than the checkpoint's is a
    ConfigError naming both."""
    overrides = OverridesParser.create().parse_overrides(user_overrides())
    choices = {o.key_or_group for o in overrides if o.key_or_group in _groups(cfg)}
    chosen = task_kind(cfg)
    if source.kind is not None and "task" in choices and chosen != source.kind:
        raise ConfigError(
            f"ckpt_path={source.path} is a {source.kind} checkpoint, but task={chosen} was "
            f"chosen: leave task= out (the checkpoint says its task) or give a {chosen} checkpoint"
        )
    rebuilt = cfg.copy()
    with open_dict(rebuilt):
        if source.format == "backbone":
            rebuilt.backbone.name = source.backbone
            rebuilt.backbone.pretrained = str(source.path)
            rebuilt.ckpt_path = None
        elif source.format == "pvtlab":
            # The checkpoint holds every weight: its run's pre-trained file is not needed.
            rebuilt.backbone = {**source.model_config["backbone"], "pretrained": None}
            rebuilt.head = source.model_config["head"]
            if source.run_config is None:
                log.warning(
                    "%s records no task and data config (an older checkpoint): evaluating with "
                    "the composed task=%s and data",
                    source.path,
                    chosen,
                )
            else:
                for group in ("task", "data"):
                    if group not in choices:
                        rebuilt[group] = source.run_config[group]
        for override in overrides:
            key = override.key_or_group
            if key in choices or override.is_delete() or key.startswith("hydra"):
                continue
            if key.split(".")[0] in {"task", "data", "backbone", "head"}:
                OmegaConf.update(rebuilt, key, OmegaConf.select(cfg, key), merge=False)
        if "predictions_dir" in rebuilt.task:  # this evaluation's folder, not the training run's
            rebuilt.task.predictions_dir = str(Path(cfg.paths.output_dir) / "predictions")
    return rebuilt


def _groups(cfg: DictConfig) -> set[str]:
    if HydraConfig.initialized():
        return set(HydraConfig.get().runtime.choices)
    return {"task", "data", "backbone", "head", "trainer"}
