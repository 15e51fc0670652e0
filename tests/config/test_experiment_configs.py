"""Every paper experiment and ablation composes, sweeps valid choices and checks its weights."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from pvtlab.config import ConfigError, check_compatible, head_kind, task_kind
from pvtlab.sweeps.naming import set_sweep_group, sweep_group
from pvtlab.sweeps.pretrained import check_pretrained
from tests.conftest import CONF_DIR, compose_config

PAPER = (
    "table2_classification",
    "table3_retinanet",
    "table3_retinanet_3x",
    "table4_mask_rcnn",
    "table5_semantic_fpn",
    "table6_detr",
    "table7_trans2seg",
    "table8_columnar",
    "table9_deep_wide",
    "table9_deep_wide_imagenet",
    "table10_gc_resnet",
    "figure5_pretraining",
    "table11_speed",
)
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
REAL_DATA = {"classification": "imagenet", "detection": "coco", "segmentation": "ade20k"}


def _options(group: str) -> set[str]:
    return {p.stem for p in (CONF_DIR / group).glob("*.yaml")}


def _sweep_params(name: str) -> dict[str, list[str]]:
    params = OmegaConf.load(CONF_DIR / "experiment" / f"{name}.yaml").hydra.sweeper.params
    return {k: str(v).split(",") for k, v in params.items()}


def test_every_paper_table_has_full_and_smoke_configs() -> None:
    assert set(PAPER) | {f"{p}_smoke" for p in PAPER} == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_sweep_jobs_compose(name: str, tmp_path: Path) -> None:
    """Each job of the experiment's sweep composes, resolves and passes the checks."""
    params = _sweep_params(name)
    assert params, f"{name}: no hydra.sweeper.params"
    for key, values in params.items():
        if "." not in key:  # a config group: every value is one of its options
            assert set(values) <= _options(key), f"{name}: {key}={values}"
    jobs = list(itertools.product(*([f"{k}={v}" for v in vs] for k, vs in params.items())))
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for job in jobs:
            cfg = compose("train", overrides=[f"experiment={name}", *job], return_hydra_config=True)
            with open_dict(cfg):
                cfg.hydra.runtime.output_dir = str(tmp_path / "run")
                cfg.hydra.mode = RunMode.MULTIRUN
                cfg.hydra.job.num = 0
            HydraConfig.instance().set_config(cfg)
            OmegaConf.to_container(
                OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
            )
            check_compatible(cfg)
            assert f"/experiments/{name}/" in cfg.hydra.sweep.dir
            smoke = name.endswith("_smoke")
            data = cfg.hydra.runtime.choices.data
            if smoke:
                assert data == "shapes" and cfg.trainer.accelerator == "cpu", job
            elif name != "figure5_pretraining" or "ablation=pretrained" in job:
                assert data == REAL_DATA[task_kind(cfg)], job
                assert str(cfg.data.root).startswith(str(cfg.paths.data_dir))
            if not smoke and task_kind(cfg) != "classification" and "ablation=scratch" not in job:
                # dense tables start from ImageNet weights of the job's own backbone
                assert cfg.backbone.pretrained.endswith(f"/pretrained/{cfg.backbone.name}.pth")


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_ablations_compose_with_every_task(task: str, tmp_path: Path) -> None:
    expected = {"deep": "pvt_medium", "wide": "pvt_small_wide", "columnar": "vit_small_32"}
    for ablation, backbone in expected.items():
        cfg = compose_config([f"task={task}", f"ablation={ablation}"], output_dir=tmp_path / "run")
        assert cfg.backbone.name == backbone and task_kind(cfg) == task
        check_compatible(cfg)
    cfg = compose_config(
        [f"task={task}", "ablation=scratch", "backbone.pretrained=/x.pth"], output_dir=tmp_path
    )
    assert task_kind(cfg) == task


def test_scratch_wins_over_an_experiments_weights(tmp_path: Path) -> None:
    cfg = compose_config(["experiment=table3_retinanet", "ablation=scratch"], output_dir=tmp_path)
    assert cfg.backbone.pretrained is None
    check_pretrained(cfg)


def test_pretrained_requires_an_existing_file(tmp_path: Path) -> None:
    cfg = compose_config(["task=detection", "ablation=pretrained"], output_dir=tmp_path / "run")
    with pytest.raises(
        ConfigError, match=r"ablation=pretrained needs .*backbone.pretrained=<file>"
    ):
        check_pretrained(cfg)
    missing = tmp_path / "nope.pth"
    cfg = compose_config(
        ["task=detection", "ablation=pretrained", f"backbone.pretrained={missing}"],
        output_dir=tmp_path / "run",
    )
    with pytest.raises(ConfigError, match=f"backbone.pretrained={missing}: no such file"):
        check_pretrained(cfg)
    weights = tmp_path / "backbone.pth"
    torch.save({}, weights)
    for override in (f"backbone.pretrained={weights}", f"+pretrained_backbone={weights}"):
        cfg = compose_config(
            ["task=segmentation", "ablation=pretrained", override], output_dir=tmp_path / "run"
        )
        check_pretrained(cfg)
        assert cfg.backbone.pretrained == str(weights)


def test_pretrain_stage_switches_to_classification(tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=figure5_pretraining_smoke", "ablation=pretrain"], output_dir=tmp_path
    )
    assert task_kind(cfg) == "classification" and head_kind(cfg.head) == "classification"
    assert cfg.task.export_backbone
    check_compatible(cfg)


@pytest.mark.parametrize(
    ("launcher", "target"),
    [("submitit_slurm", "SlurmLauncher"), ("submitit_local", "LocalLauncher")],
)
def test_submitit_launchers_compose(launcher: str, target: str, tmp_path: Path) -> None:
    cfg = compose_config(
        ["experiment=table3_retinanet", f"hydra/launcher={launcher}"], output_dir=tmp_path / "run"
    )
    assert cfg.hydra.launcher._target_.endswith(target)


def test_wandb_runs_are_grouped_by_sweep(tmp_path: Path) -> None:
    cfg = compose_config(["logger=wandb"], output_dir=tmp_path / "outputs" / "x" / "0")
    set_sweep_group(cfg)  # a single run: no group
    assert cfg.logger.wandb.group is None
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.sweep.dir = str(tmp_path / "outputs" / "experiments" / "t3" / "2026-01-01")
    HydraConfig.instance().set_config(cfg)
    cfg.paths.log_dir = str(tmp_path / "outputs")
    assert sweep_group(cfg) == "experiments-t3-2026-01-01"
    set_sweep_group(cfg)
    assert cfg.logger.wandb.group == "experiments-t3-2026-01-01"
    cfg.logger.wandb.group = "mine"
    set_sweep_group(cfg)
    assert cfg.logger.wandb.group == "mine"


# ------------------------------------- the release's settings as the paper experiments' defaults


def _job(tmp_path: Path, *overrides: str):
    cfg = compose_config(list(overrides), output_dir=tmp_path / "run")
    return OmegaConf.to_container(
        OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=True
    )


def test_table11_bounds_the_longer_side_as_the_release(tmp_path: Path) -> None:
    for short, longest in ((640, 1066), (800, 1333)):
        cfg = _job(tmp_path, "experiment=table11_speed", f"recipe.size=short{short}")
        assert cfg["data"]["transforms"]["max_size"] == longest
        assert cfg["data"]["transforms"]["train_short_side"] == [short]


def test_pvt_large_mask_rcnn_trains_one_image_per_gpu(tmp_path: Path) -> None:
    large = _job(tmp_path, "experiment=table4_mask_rcnn", "backbone=pvt_large")
    assert large["data"]["loader"]["batch_size"] == 1
    assert large["task"]["optimizer"]["lr"] == pytest.approx(2e-4 / 1.4)
    small = _job(tmp_path, "experiment=table4_mask_rcnn", "backbone=pvt_small")
    assert small["data"]["loader"]["batch_size"] == 2 and small["task"]["optimizer"]["lr"] == 2e-4
    retina = _job(tmp_path, "experiment=table3_retinanet", "backbone=pvt_large")
    assert retina["data"]["loader"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("experiment", "lr", "norm"),
    [("table3_retinanet", 0.01, "eval"), ("table4_mask_rcnn", 0.02, "eval")],
)
def test_cnn_detection_rows_are_mmdetections_baselines(
    tmp_path: Path, experiment: str, lr: float, norm: str
) -> None:
    cfg = _job(tmp_path, f"experiment={experiment}", "backbone=resnet50")
    assert (cfg["backbone"]["batch_norm"], cfg["backbone"]["frozen_stages"]) == (norm, 1)
    optimizer = cfg["task"]["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["momentum"]) == ("sgd", lr, 0.9)
    assert optimizer["weight_decay"] == 1e-4
    pvt = _job(tmp_path, f"experiment={experiment}", "backbone=pvt_small")
    assert "frozen_stages" not in pvt["backbone"] and pvt["task"]["optimizer"]["name"] == "adamw"


def test_detr_r50_baseline_freezes_batch_norm(tmp_path: Path) -> None:
    cfg = _job(tmp_path, "experiment=table6_detr", "backbone=resnet50")
    assert (cfg["backbone"]["batch_norm"], cfg["backbone"]["frozen_stages"]) == ("frozen", 1)
    assert cfg["task"]["optimizer"]["name"] == "adamw"


def test_table5_defaults_to_the_released_40k_schedule(tmp_path: Path) -> None:
    cfg = _job(tmp_path, "experiment=table5_semantic_fpn")
    assert cfg["trainer"]["max_steps"] == 40000
    assert cfg["data"]["loader"]["batch_size"] == 4 and cfg["task"]["optimizer"]["lr"] == 2e-4
    assert cfg["data"]["transforms"]["test_size_divisor"] == 32
    text = _job(tmp_path, "experiment=table5_semantic_fpn", "recipe.schedule=80k")
    assert text["trainer"]["max_steps"] == 80000
    assert text["data"]["loader"]["batch_size"] == 2 and text["task"]["optimizer"]["lr"] == 1e-4
    resnet = _job(tmp_path, "experiment=table5_semantic_fpn", "backbone=resnet50")
    optimizer = resnet["task"]["optimizer"]
    assert (optimizer["name"], optimizer["lr"], optimizer["weight_decay"]) == ("sgd", 0.02, 5e-4)
    assert "resnext101_32x4d" in _sweep_params("table5_semantic_fpn")["backbone"]


@pytest.mark.parametrize("experiment", ["table3_retinanet", "table5_semantic_fpn"])
def test_dense_tasks_decay_every_parameter(tmp_path: Path, experiment: str) -> None:
    optimizer = _job(tmp_path, f"experiment={experiment}")["task"]["optimizer"]
    assert optimizer["no_weight_decay_1d"] is False
    assert optimizer["no_weight_decay_module_lists"] is False


def test_imagenet_decays_all_but_1d_parameters_and_the_class_token(tmp_path: Path) -> None:
    task = _job(tmp_path, "experiment=table2_classification")["task"]
    optimizer, scheduler = task["optimizer"], task["scheduler"]
    assert optimizer["no_weight_decay"] == ["cls_token"] and optimizer["no_weight_decay_1d"]
    assert optimizer["no_weight_decay_module_lists"] is False
    assert scheduler["per_epoch"] and scheduler["epoch_lag"] == 1
    assert (scheduler["warmup_lr"], scheduler["min_lr"]) == (1e-6, 1e-5)
