"""Every choice of every config group composes, resolves and passes the compatibility checks;
group files hold their own values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pvtlab.config import ConfigError, check_compatible, head_kind, task_kind
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
# Overlays: the one home of values that depend on a combination of choices. Every other folder
# of conf/ is a group whose files hold their own values.
OVERLAYS = ("recipe", "experiment", "ablation", "local", "debug")
GROUP_FILES = sorted(
    p for p in CONF_DIR.glob("*/**/*.yaml") if p.relative_to(CONF_DIR).parts[0] not in OVERLAYS
)
# Keys that described a choice instead of being an argument of what it builds, each read by
# another group or stripped by the pipeline.
META_KEYS = {
    "backbone": {"family", "drop_path_by_task", "grad_clip_by_task", "kwargs", "memory_format"},
    "head": {"kind", "features_only", "masks", "optim"},
    "task": {"kind", "monitor", "monitor_mode", "static_shapes"},
}
# Resolvers that read no group: Hydra's run facts, the environment, the clock.
RESOLVERS = {"hydra", "oc.env", "now"}


def _options(group: str) -> list[str]:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        return sorted(loader.get_group_options(group))


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {}


def _kind(group: str, option: str) -> str | None:
    """The task a head or data choice serves (None: any)."""
    node = _load(CONF_DIR / group / f"{option}.yaml")
    if group == "head":
        while "_target_" not in node:  # a size variant of another head file
            node = _load(CONF_DIR / group / f"{node['defaults'][0]}.yaml")
        return head_kind(OmegaConf.create(node))
    return None if option == "shapes" else node.get("kind")


def _overrides(group: str, option: str) -> list[str]:
    """The partners a choice needs: a head or data set of one kind goes with that task."""
    if group in ("head", "data"):
        kind = _kind(group, option)
        return [f"task={kind}", f"{group}={option}"] if kind else [f"{group}={option}"]
    if group == "recipe":
        data, _, task = option.partition("_")
        return [f"data={data}", f"task={task}"]
    return [f"{group}={option}"]


def _overlay_overrides(path: Path) -> list[str]:
    """The choices that select a nested overlay: recipe/backbone_task/<backbone>_<task>.yaml,
    recipe/<data>_<task>_head/<head>.yaml, recipe/<data>_<task>_backbone/<backbone>.yaml,
    recipe/<data>_<task>_backbone_head/<backbone>_<head>.yaml."""
    folder, option = path.parent.name, path.stem
    if folder == "backbone_task":
        backbone, _, task = option.rpartition("_")
        return [f"backbone={backbone}", f"task={task}"]
    if folder.endswith("_backbone_head"):
        data, _, task = folder.removesuffix("_backbone_head").partition("_")
        head = next(
            h for h in sorted(_options("head"), key=len, reverse=True) if option.endswith(f"_{h}")
        )
        backbone = option.removesuffix(f"_{head}")
        return [f"data={data}", f"task={task}", f"backbone={backbone}", f"head={head}"]
    if folder.endswith("_backbone"):
        data, _, task = folder.removesuffix("_backbone").partition("_")
        return [f"data={data}", f"task={task}", f"backbone={option}"]
    data, _, task = folder.removesuffix("_head").partition("_")
    return [f"data={data}", f"task={task}", f"head={option}"]


CASES = [(g, o) for g in GROUPS for o in _options(g)]
OVERLAY_FILES = sorted((CONF_DIR / "recipe").glob("*/*.yaml"))


def _resolves(cfg) -> None:
    # Every interpolation resolves (a typo in a key or a missing group fails here); the hydra
    # node holds job-time values (job.num) that only a launched job has.
    OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_choice_composes(group: str, option: str, tmp_path: Path) -> None:
    cfg = compose_config(_overrides(group, option), output_dir=tmp_path / "run")
    _resolves(cfg)
    check_compatible(cfg)
    if group == "recipe":
        assert cfg.data.kind == task_kind(cfg)


@pytest.mark.parametrize(
    "path", OVERLAY_FILES, ids=[str(p.relative_to(CONF_DIR)) for p in OVERLAY_FILES]
)
def test_overlay_is_selected_by_its_choices(path: Path, tmp_path: Path) -> None:
    """A nested overlay's name is the combination that selects it, and its values take effect."""
    cfg = compose_config(_overlay_overrides(path), output_dir=tmp_path / "run")
    _resolves(cfg)
    check_compatible(cfg)
    expected = OmegaConf.to_container(OmegaConf.load(path))
    effective = OmegaConf.to_container(cfg, resolve=False)
    for key in ("backbone", "head", "task", "trainer", "data"):
        _assert_contains(effective[key], expected.get(key, {}), key)


def _assert_contains(actual: dict, expected: dict, where: str) -> None:
    for key, value in expected.items():
        if isinstance(value, dict) and value and isinstance(actual.get(key), dict):
            _assert_contains(actual[key], value, f"{where}.{key}")
        else:
            assert actual.get(key) == value, f"{where}.{key}"


@pytest.mark.parametrize(
    "path", GROUP_FILES, ids=[str(p.relative_to(CONF_DIR)) for p in GROUP_FILES]
)
def test_group_files_read_no_other_group(path: Path) -> None:
    """A group file interpolates only its own keys, the shared paths, the run's own root keys
    (seed, name, tags) and resolvers that read no group; a value that depends on another choice
    belongs in an overlay (recipe/, experiment/)."""
    group = path.relative_to(CONF_DIR).parts[0]
    text = path.read_text()
    root_keys = {k for k in _load(CONF_DIR / "train.yaml") if k != "defaults"}
    foreign = []
    for match in re.finditer(r"\$\{\s*([\w.]*)(:?)([\w.]*)", text):
        name, is_resolver, argument = match.groups()
        if is_resolver:
            if name in RESOLVERS:
                continue
            name = argument  # oc.select:<key>,<default>
        head = name.split(".")[0]
        if name.startswith(".") or head in (group, "paths") or name in root_keys:
            continue
        foreign.append(match.group(0))
    assert not foreign, f"{path.relative_to(CONF_DIR)} reads other groups: {foreign}"


@pytest.mark.parametrize("group", sorted(META_KEYS))
def test_group_files_hold_no_meta_keys(group: str) -> None:
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        left = META_KEYS[group] & set(_load(path))
        assert not left, f"{path.relative_to(CONF_DIR)}: {sorted(left)}"


def test_core_groups_have_the_design_choices() -> None:
    assert {"classification", "detection", "segmentation"} <= set(_options("task"))
    assert {"cpu", "gpu", "ddp", "debug"} <= set(_options("trainer"))
    assert {"csv", "tensorboard", "wandb", "none"} <= set(_options("logger"))


def test_incompatible_head_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(["task=classification", "head=retinanet"], output_dir=tmp_path / "run")
    with pytest.raises(ConfigError, match="Heads for task=classification: linear"):
        check_compatible(cfg)


def test_eval_config_composes(tmp_path: Path) -> None:
    cfg = compose_config(["task=classification"], config_name="eval", output_dir=tmp_path / "run")
    _resolves(cfg)
    assert cfg.split in ("val", "test")


@pytest.mark.parametrize(
    ("overrides", "drop_path", "clip"),
    [
        (["backbone=pvt_tiny"], 0.1, None),
        (["backbone=pvt_medium"], 0.3, 1.0),
        (["backbone=pvt_medium", "task=detection"], 0.0, None),
        (["backbone=pvt_large", "data=imagenet"], 0.3, 1.0),
        (["backbone=pvt_large", "task=detection"], 0.0, None),
        (["backbone=pvt_large", "task=segmentation"], 0.1, None),
        (["backbone=pvt_small_wide", "data=imagenet"], 0.3, 1.0),
        (["backbone=resnet50", "task=detection"], 0.0, None),
    ],
)
def test_drop_path_and_clipping_by_backbone_and_task(
    overrides: list[str], drop_path: float, clip: float | None, tmp_path: Path
) -> None:
    """docs/paper.md section 1: PVT-M/L train with drop path 0.3 and clipping at 1.0 on
    ImageNet, without drop path under a detector; T/S with 0.1 everywhere."""
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    assert cfg.backbone.drop_path_rate == drop_path
    assert cfg.trainer.gradient_clip_val == clip


@pytest.mark.parametrize(
    ("overrides", "lr", "lr_mults", "masks"),
    [
        (["task=detection"], 1.0e-4, None, False),
        (["task=detection", "head=mask_rcnn"], 1.0e-3, None, True),
        (["task=detection", "head=detr"], 2.0e-4, {"backbone.": 0.1}, False),
        (["data=coco", "task=detection"], 1.0e-4, None, False),
        (["data=coco", "task=detection", "head=mask_rcnn"], 2.0e-4, None, True),
        (["data=coco", "task=detection", "head=detr"], 1.0e-4, {"backbone.": 0.1}, False),
    ],
)
def test_detection_optimizer_and_masks_by_data_and_head(
    overrides: list[str], lr: float, lr_mults: dict | None, masks: bool, tmp_path: Path
) -> None:
    cfg = compose_config(overrides, output_dir=tmp_path / "run")
    assert cfg.task.optimizer.lr == lr
    lr_mults_cfg = cfg.task.optimizer.lr_mults
    assert (OmegaConf.to_container(lr_mults_cfg) if lr_mults_cfg else None) == lr_mults
    assert cfg.data.with_masks is masks


def test_shapes_classification_stores_position_embeddings_at_its_input_size(
    tmp_path: Path,
) -> None:
    assert compose_config([], output_dir=tmp_path / "run").backbone.img_size == 64
    cfg = compose_config(["task=detection"], output_dir=tmp_path / "run")
    assert cfg.backbone.img_size == 224


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


@pytest.mark.parametrize(
    ("task", "metric"),
    [("classification", "val/acc1"), ("detection", "val/mAP"), ("segmentation", "val/mIoU")],
)
def test_best_checkpoint_is_chosen_by_the_tasks_metric(
    task: str, metric: str, tmp_path: Path
) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint

    from pvtlab.pipeline import build_trainer

    trainer = build_trainer(compose_config([f"task={task}"], output_dir=tmp_path / "run"))
    monitors = {(c.monitor, c.mode) for c in trainer.callbacks if isinstance(c, ModelCheckpoint)}
    assert monitors == {(metric, "max"), (None, "min")}  # the best, and the step checkpoint


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
