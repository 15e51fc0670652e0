"""Every choice of every config group composes, resolves and passes the compatibility checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pvtlab.utils.config import ConfigError, check_compatible
from tests.conftest import CONF_DIR, compose_config

GROUPS = (
    "backbone",
    "task",
    "head",
    "data",
    "recipe",
    "trainer",
    "logger",
    "callbacks",
    "paths",
    "experiment",
    "ablation",
)


def _options(group: str) -> list[str]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(group))


def _kind(group: str, option: str) -> str | None:
    return (yaml.safe_load((CONF_DIR / group / f"{option}.yaml").read_text()) or {}).get("kind")


def _overrides(group: str, option: str) -> list[str]:
    """The partners a choice needs: a head or data set of one kind goes with that task."""
    if group in ("head", "data"):
        kind = _kind(group, option)
        if kind and not str(kind).startswith("$"):
            return [f"task={kind}", f"{group}={option}"]
        return [f"{group}={option}"]
    if group == "recipe":
        data, _, task = option.partition("_")
        return [f"data={data}", f"task={task}"]
    return [f"{group}={option}"]


CASES = [(g, o) for g in GROUPS for o in _options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_choice_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config(_overrides(group, option), output_dir=tmp_path / "run")
    # Every interpolation resolves (a typo in a key or a missing group fails here); the hydra
    # node holds job-time values (job.num) that only a launched job has.
    OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    check_compatible(cfg)
    if group == "recipe":
        assert cfg.data.kind == cfg.task.kind


def test_core_groups_have_the_design_choices() -> None:
    assert {"classification", "detection", "segmentation"} <= set(_options("task"))
    assert {"cpu", "gpu", "ddp", "debug"} <= set(_options("trainer"))
    assert {"csv", "tensorboard", "wandb", "none"} <= set(_options("logger"))


def test_incompatible_head_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(["task=classification"], output_dir=tmp_path / "run")
    cfg.head.kind = "detection"
    with pytest.raises(ConfigError, match="Heads for task=classification: linear"):
        check_compatible(cfg)


def test_eval_config_composes(tmp_path: Path) -> None:
    cfg = compose_config(["task=classification"], config_name="eval", output_dir=tmp_path / "run")
    OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )
    assert cfg.split in ("val", "test")


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
@pytest.mark.parametrize(
    ("task", "benchmark"), [("classification", True), ("segmentation", True), ("detection", False)]
)
def test_gpu_trainers_use_cudnn_benchmark_only_where_shapes_repeat(
    trainer: str, task: str, benchmark: bool, tmp_path: Path
) -> None:
    """Detection batches change shape every step (multi-scale sizes, sampled RoI counts): cuDNN
    benchmark mode would re-time its algorithms at each one."""
    cfg = compose_config([f"trainer={trainer}", f"task={task}"], output_dir=tmp_path / "run")
    assert cfg.trainer.benchmark is benchmark


def test_progress_bar_can_be_switched_off_from_the_trainer(tmp_path: Path) -> None:
    """`trainer.enable_progress_bar=false` drops the callbacks group's progress bar, which
    Lightning would otherwise refuse beside it."""
    from lightning.pytorch.callbacks import ProgressBar

    from pvtlab.pipeline import build_trainer

    def bars(overrides: list[str]) -> list[object]:
        trainer = build_trainer(compose_config(overrides, output_dir=tmp_path / "run"))
        return [c for c in trainer.callbacks if isinstance(c, ProgressBar)]

    assert bars([])  # the default group shows one
    assert bars(["trainer.enable_progress_bar=false"]) == []


@pytest.mark.parametrize("trainer", ["ddp", "ddp_cpu"])
def test_ddp_trainers_keep_gradients_in_the_all_reduce_buckets(
    trainer: str, tmp_path: Path
) -> None:
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    cfg = compose_config([f"trainer={trainer}"], output_dir=tmp_path / "run")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, DDPStrategy)
    assert strategy._ddp_kwargs == {"gradient_as_bucket_view": True}
