"""`src/eval.py ckpt_path=<file>` needs nothing else: the checkpoint names its task, network and
data; command-line overrides apply on top; results land in outputs/<task>/eval/<timestamp>/."""

from __future__ import annotations

import copy
import csv
import json
from collections.abc import Sequence
from pathlib import Path

import pytest
import timm
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from PIL import Image

import pvtlab.models  # noqa: F401 - registers the PVT family with timm
from pvtlab import pipeline
from pvtlab.config import ConfigError
from pvtlab.models.hf import write_transformers
from pvtlab.models.layouts import pvt_arguments_of
from pvtlab.run_config import register_resolver
from tests.conftest import CONF_DIR, compose_config

TINY = [
    "+backbone.depths=[1,1,1,1]",
    "+backbone.embed_dims=[16,32,48,64]",
    "+backbone.num_heads=[1,1,1,1]",
    "data.loader.num_workers=0",
    "data.generator.train_images=8",
    "data.generator.val_images=8",
    "data.loader.batch_size=4",
]
SHORT_RUN = [
    "trainer.max_steps=1",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
    "logger=none",
]
RUNS = {
    "classification": ["task=classification"],
    "segmentation": ["task=segmentation", "head=semantic_fpn"],
}


def _runnable(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="module", params=list(RUNS))
def trained(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, data_dir: Path
) -> tuple[str, Path]:
    """A one-step shapes run of each kind; its task and last checkpoint."""
    folder = tmp_path_factory.mktemp(request.param)
    cfg = compose_config(
        [*RUNS[request.param], *TINY, *SHORT_RUN], output_dir=folder / "train", data_dir=data_dir
    )
    pipeline.train(_runnable(cfg))
    return request.param, folder / "train" / "checkpoints" / "last.ckpt"


def eval_config(overrides: Sequence[str], log_dir: Path, data_dir: Path) -> DictConfig:
    """Compose eval.yaml as `src/eval.py` does, the run folder named by `hydra.run.dir`."""
    register_resolver()  # what importing src/eval.py does
    overrides = [*overrides, f"paths.log_dir={log_dir}", f"paths.data_dir={data_dir}"]
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("eval", overrides=overrides, return_hydra_config=True)
    HydraConfig.instance().set_config(copy.deepcopy(cfg))  # for hydra.run.dir's ${hydra:...}
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = OmegaConf.select(cfg, "hydra.run.dir")
    HydraConfig.instance().set_config(cfg)
    return _runnable(cfg)


def test_a_checkpoint_alone_evaluates_as_its_run(
    trained: tuple[str, Path], tmp_path: Path, data_dir: Path
) -> None:
    kind, ckpt = trained
    metrics = pipeline.evaluate(eval_config([f"ckpt_path={ckpt}"], tmp_path / "a", data_dir))

    (run,) = (tmp_path / "a" / kind / "eval").iterdir()
    assert json.loads((run / "metrics.json").read_text()) == pytest.approx(metrics)
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.backbone.embed_dims == [16, 32, 48, 64]
    assert saved.head == OmegaConf.load(ckpt.parents[1] / "config.yaml").head
    assert saved.data.generator.train_images == 8 and saved.data.loader.num_workers == 0
    if kind == "classification":  # one row per val image: its file, label and top-5 classes
        with (run / "predictions" / "predictions.csv").open() as file:
            rows = list(csv.DictReader(file))
        assert len(rows) == 8 and all(Path(row["file"]).is_file() for row in rows)
        saved_ckpt = torch.load(ckpt, map_location="cpu", weights_only=True)
        names = saved_ckpt["hyper_parameters"]["model_config"]["class_names"]
        assert {row["label"] for row in rows} | {row["class_1"] for row in rows} <= set(names)

    full = [f"ckpt_path={ckpt}", *RUNS[kind], *TINY]  # the trainer is eval's own
    reference = pipeline.evaluate(eval_config(full, tmp_path / "b", data_dir))
    assert metrics == pytest.approx(reference)


def test_overrides_apply_on_top_of_the_checkpoint(
    trained: tuple[str, Path], tmp_path: Path, data_dir: Path
) -> None:
    kind, ckpt = trained
    root = tmp_path / "elsewhere"
    cfg = eval_config(
        [f"ckpt_path={ckpt}", f"data.root={root}", "split=test"], tmp_path / "logs", data_dir
    )
    metrics = pipeline.evaluate(cfg)
    assert metrics and all(name.startswith("test/") for name in metrics)
    assert root.is_dir()  # the shapes data generated where the override says
    (run,) = (tmp_path / "logs" / kind / "eval").iterdir()
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.data.root == str(root) and saved.data.generator.val_images == 8


def test_a_task_choice_that_contradicts_the_checkpoint_names_both(
    trained: tuple[str, Path], tmp_path: Path, data_dir: Path
) -> None:
    kind, ckpt = trained
    other = "detection"
    cfg = eval_config([f"ckpt_path={ckpt}", f"task={other}"], tmp_path, data_dir)
    with pytest.raises(ConfigError, match=f"{kind} checkpoint.*task={other}"):
        pipeline.evaluate(cfg)


@pytest.mark.parametrize("layout", ["release", "transformers"])
def test_released_weights_evaluate_as_an_imagenet_classifier(
    layout: str, tmp_path: Path, data_dir: Path
) -> None:
    torch.manual_seed(0)
    model = timm.create_model("pvt_tiny")
    if layout == "release":  # pvtlab's state dict is the release's flat layout
        release = tmp_path / "pvt_tiny.pth"
        torch.save(model.state_dict(), release)
    else:
        release = tmp_path / "pvt-tiny-224"
        write_transformers(model.state_dict(), pvt_arguments_of(model), release)
    # An image folder whose classes are named by the model's class index (ImageNet's 0 and 1).
    images = tmp_path / "imagenet"
    for index in (0, 1):
        (images / "val" / str(index)).mkdir(parents=True)
        Image.new("RGB", (48, 40), (40 * index, 90, 160)).save(
            images / "val" / str(index) / "a.png"
        )
    cfg = eval_config(
        [
            f"ckpt_path={release}",
            "data=imagenet",
            f"data.root={images}",
            "data.loader.num_workers=0",
            "data.loader.batch_size=2",
        ],
        tmp_path / "logs",
        data_dir,
    )
    metrics = pipeline.evaluate(cfg)
    assert "val/acc1" in metrics
    (run,) = (tmp_path / "logs" / "classification" / "eval").iterdir()
    saved = OmegaConf.load(run / "config.yaml")
    assert saved.backbone.name == "pvt_tiny" and saved.backbone.pretrained == str(release)
    assert (run / "metrics.json").is_file()
    assert "val/acc5" in json.loads((run / "metrics.json").read_text())


class NotPlain:
    pass


def test_a_file_weights_only_refuses_is_one_clear_error(tmp_path: Path) -> None:
    foreign = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "extra": NotPlain()}, foreign)
    with pytest.raises(ConfigError, match="is not a pvtlab checkpoint") as error:
        pipeline.read_checkpoint(foreign)
    message = str(error.value)
    assert str(foreign) in message and "NotPlain" in message
    assert "weights_only=False" not in message and "safe_globals" not in message
