"""`load_from=<ckpt>`: a new run starts from a pvtlab checkpoint's weights (the whole model)."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, open_dict

from pvtlab import pipeline
from pvtlab.config import ConfigError


def _runnable(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _checkpoint_of(task: torch.nn.Module, path: Path, fill: float = 0.25) -> Path:
    """A checkpoint holding `task`'s tensors, every floating one set to `fill`."""
    state = {
        k: torch.full_like(v, fill) if v.is_floating_point() else v.clone()
        for k, v in task.state_dict().items()
    }
    torch.save({"state_dict": state}, path)
    return path


def test_every_tensor_of_the_same_model_is_loaded(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = make_config()
    source = _checkpoint_of(pipeline.build_task(cfg), tmp_path / "source.ckpt")
    task = pipeline.build_task(cfg)
    assert pipeline.initialise_from(task, source) == []
    for name, tensor in task.state_dict().items():
        if tensor.is_floating_point():
            assert torch.all(tensor == 0.25), name


def test_a_head_for_other_classes_keeps_its_fresh_values(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    source = _checkpoint_of(pipeline.build_task(make_config()), tmp_path / "source.ckpt")
    task = pipeline.build_task(make_config(["data.num_classes=5"]))
    fresh_head = task.model.head.weight.detach().clone()
    kept = pipeline.initialise_from(task, source)
    assert kept == ["model.head.bias", "model.head.weight"]
    assert torch.equal(task.model.head.weight, fresh_head)
    assert torch.all(task.model.patch_embed1.proj.weight == 0.25)


def test_checkpoint_of_another_network_is_a_clear_error(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    torch.save({"state_dict": {"net.0.weight": torch.zeros(3)}}, tmp_path / "other.ckpt")
    with pytest.raises(ConfigError, match="no tensor fits"):
        pipeline.initialise_from(pipeline.build_task(make_config()), tmp_path / "other.ckpt")
    torch.save({"model": {}}, tmp_path / "released.pth")
    with pytest.raises(ConfigError, match=r"backbone\.pretrained="):
        pipeline.initialise_from(pipeline.build_task(make_config()), tmp_path / "released.pth")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["load_from=/nowhere/x.ckpt"], "load_from=/nowhere/x.ckpt: no such file"),
        (["load_from={file}", "ckpt_path={file}"], "choose one"),
    ],
)
def test_bad_load_from_fails_before_data(
    overrides: list[str],
    message: str,
    make_config: Callable[..., DictConfig],
    tmp_path: Path,
) -> None:
    source = _checkpoint_of(pipeline.build_task(make_config()), tmp_path / "source.ckpt")
    cfg = _runnable(make_config([o.format(file=source) for o in overrides]))
    cfg.paths.data_dir = str(tmp_path / "no-data")
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.train(cfg)
    assert not (tmp_path / "no-data").exists()


def test_training_run_starts_from_the_loaded_weights(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    source = _checkpoint_of(pipeline.build_task(make_config()), tmp_path / "source.ckpt")
    cfg = make_config(
        [
            f"load_from={source}",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=1",
            "trainer.limit_val_batches=1",
            "test=false",
        ]
    )
    pipeline.train(_runnable(cfg))
    last = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    head = last["state_dict"]["model.head.weight"]
    # One optimiser step from 0.25 (Adam moves a weight by about the lr, here < 1e-3); a fresh
    # head is drawn around 0 with std 0.02.
    assert torch.allclose(head, torch.full_like(head, 0.25), atol=0.01)
