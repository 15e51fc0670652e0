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
