"""ClassificationTask: the DeiT recipe's pieces, checkpoints, backbone export and evaluation."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from omegaconf import DictConfig, open_dict
from PIL import Image
from timm.data import Mixup
from timm.layers import DropPath
from torch.utils.data import TensorDataset

from pvtlab import pipeline
from pvtlab.data.imagefolder import ImageFolderError
from pvtlab.export import main as export_main
from pvtlab.models import create_backbone
from pvtlab.tasks.classification import (
    ClassificationTask,
    _make_mixup,
    checkpoint_model_state,
    export_backbone,
)
from pvtlab.tasks.optim import param_groups

NUM_CLASSES = 4
SIZE = 32


def tiny_task(**overrides: Any) -> ClassificationTask:
    model = create_backbone(
        "pvt_tiny",
        features_only=False,
        num_classes=NUM_CLASSES,
        drop_path_rate=0.1,
        img_size=SIZE,
    )
    description = {
        "backbone": {
            "_target_": "pvtlab.models.create_backbone",
            "_partial_": True,
            "name": "pvt_tiny",
            "img_size": SIZE,
        },
        "head": {},
        "num_classes": NUM_CLASSES,
    }
    settings: dict[str, Any] = {
        "optimizer": {"lr": 5e-4, "weight_decay": 0.05},
        "scheduler": {"name": "cosine", "warmup_epochs": 1, "warmup_factor": 1e-3},
        "mixup": {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1},
        **overrides,
    }
    return ClassificationTask(model, description, **settings)


def tiny_data(batch_size: int = 4) -> L.LightningDataModule:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(16, 3, SIZE, SIZE, generator=generator)
    labels = torch.arange(16) % NUM_CLASSES
    dataset = TensorDataset(images, labels)
    return L.LightningDataModule.from_datasets(dataset, dataset, batch_size=batch_size)


def fit(task: ClassificationTask, root: Path, epochs: int = 2, **trainer: Any) -> L.Trainer:
    checkpoint = ModelCheckpoint(
        dirpath=root / "checkpoints", monitor="val/acc1", mode="max", save_last=True
    )
    settings = {
        "max_epochs": epochs,
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "default_root_dir": str(root),
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "callbacks": [checkpoint],
        "accelerator": "cpu",
        **trainer,
    }
    trainer_ = L.Trainer(**settings)
    trainer_.fit(task, datamodule=tiny_data())
    return trainer_


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[ClassificationTask, L.Trainer]:
    """Two short epochs with Mixup / CutMix and EMA: checkpoints and the exported backbone."""
    root = tmp_path_factory.mktemp("run")
    task = tiny_task(ema={"enabled": True, "decay": 0.5})
    return task, fit(task, root)


def test_fit_logs_the_metrics(trained: tuple[ClassificationTask, L.Trainer]) -> None:
    _, trainer = trained
    metrics = trainer.callback_metrics
    for name in ("train/loss_epoch", "val/loss", "val/acc1", "val/acc5", "val/acc1_ema"):
        assert name in metrics, sorted(metrics)
        assert torch.isfinite(metrics[name])
    assert 0 <= float(metrics["val/acc1"]) <= float(metrics["val/acc5"]) <= 1


def test_checkpoints_hold_the_model_and_the_ema(
    trained: tuple[ClassificationTask, L.Trainer],
) -> None:
    task, trainer = trained
    checkpoint = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
    assert all(key.startswith("model.") for key in checkpoint["state_dict"])
    ema = checkpoint["ema_state_dict"]
    assert set(ema) == set(task.model.state_dict())
    # decay 0.5 after several steps: the average differs from the weights.
    assert not torch.equal(ema["head.weight"], checkpoint["state_dict"]["model.head.weight"])


def test_backbone_is_exported_at_the_end(trained: tuple[ClassificationTask, L.Trainer]) -> None:
    task, trainer = trained
    path = Path(trainer.default_root_dir) / "backbone.pth"
    assert task.exported_backbone == path and path.is_file()
    best = torch.load(trainer.checkpoint_callback.best_model_path, weights_only=True)
    exported = torch.load(path, weights_only=True)
    assert exported.keys() == task.model.state_dict().keys()
    assert all(torch.equal(v, best["state_dict"][f"model.{k}"]) for k, v in exported.items())
    rows = task.summary_rows({"val/acc1": 0.75, "test/acc1": 0.5})
    assert rows["val top-1 error (%)"] == "25.00" and rows["test top-1 error (%)"] == "50.00"
    assert "backbone.pth" in rows["backbone weights"]


@pytest.mark.parametrize("img_size", [SIZE, 224])
def test_export_round_trip_into_a_feature_backbone(
    trained: tuple[ClassificationTask, L.Trainer], tmp_path: Path, img_size: int
) -> None:
    """The exported file is what detection and segmentation read with backbone.pretrained=."""
    _, trainer = trained
    path = export_backbone(trainer.checkpoint_callback.last_model_path, tmp_path / "b.pth")
    features = create_backbone(
        "pvt_tiny", features_only=True, pretrained=path, drop_path_rate=0.1, img_size=img_size
    )
    weights = torch.load(path, weights_only=True)
    loaded = {k.removeprefix("model."): v for k, v in features.state_dict().items()}
    assert loaded and set(loaded) <= set(weights)
    for key, value in loaded.items():  # position embeddings are resized to another img_size
        if img_size == SIZE or not key.startswith("pos_embed"):
            assert torch.equal(value, weights[key]), key
    maps = features(torch.randn(1, 3, 64, 64))
    assert [m.shape[1] for m in maps] == [64, 128, 320, 512]
    # The Lightning checkpoint itself is accepted too.
    create_backbone(
        "pvt_tiny",
        features_only=True,
        pretrained=trainer.checkpoint_callback.last_model_path,
        img_size=SIZE,
    )


def test_exported_classifier_gives_the_same_logits(
    trained: tuple[ClassificationTask, L.Trainer], tmp_path: Path
) -> None:
    _, trainer = trained
    path = export_backbone(trainer.checkpoint_callback.last_model_path, tmp_path / "c.pth")
    classifier = create_backbone(
        "pvt_tiny", features_only=False, num_classes=NUM_CLASSES, pretrained=path, img_size=SIZE
    ).eval()
    reference = tiny_task().eval()
    reference.model.load_state_dict(
        checkpoint_model_state(
            torch.load(trainer.checkpoint_callback.last_model_path, weights_only=True)
        )
    )
    images = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.allclose(classifier(images), reference.model(images), atol=1e-6)


def test_export_command(
    trained: tuple[ClassificationTask, L.Trainer],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, trainer = trained
    last = trainer.checkpoint_callback.last_model_path
    export_main([last, str(tmp_path / "plain.pth")])
    assert f"backbone.pretrained={tmp_path / 'plain.pth'}" in capsys.readouterr().out
    export_main([last, str(tmp_path / "ema.pth"), "--ema"])
    ema = torch.load(tmp_path / "ema.pth", weights_only=True)
    assert torch.equal(
        ema["head.weight"], torch.load(last, weights_only=True)["ema_state_dict"]["head.weight"]
    )
    with pytest.raises(SystemExit):
        export_main([str(tmp_path / "ema.pth")])  # a state dict, not a checkpoint
    assert "cannot export a backbone" in capsys.readouterr().err


def test_lr_follows_the_linear_scaling_rule(tmp_path: Path) -> None:
    task = tiny_task(lr_base_batch_size=512)
    trainer = fit(task, tmp_path, epochs=1, limit_val_batches=0)
    group = trainer.optimizers[0].param_groups[0]
    assert group["initial_lr"] == pytest.approx(5e-4 * 4 / 512)
    assert trainer.lr_scheduler_configs[0].interval == "step"


def test_a_scaled_lr_still_starts_at_the_absolute_warmup_start(tmp_path: Path) -> None:
    # The release's schedule warms up from 1e-6 whatever the batch: the batch rule scales the
    # base lr before the schedule is built, never the first step's value.
    scheduler = {
        "name": "cosine",
        "per_epoch": True,
        "epoch_lag": 1,
        "warmup_epochs": 1,
        "warmup_lr": 1e-6,
        "min_lr": 1e-5,
    }
    task = tiny_task(lr_base_batch_size=2, scheduler=scheduler)  # a global batch of 4: x2
    seen: list[float] = []

    class FirstLr(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *_: Any) -> None:
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    fit(task, tmp_path, epochs=2, limit_val_batches=0, callbacks=[FirstLr()])
    assert seen[0] == pytest.approx(1e-6)
    assert task.trainer.optimizers[0].param_groups[0]["initial_lr"] == pytest.approx(5e-4 * 2)


def test_drop_path_is_off_during_its_warmup(tmp_path: Path) -> None:
    seen: list[list[float]] = []

    class Record(Callback):
        def on_train_batch_start(self, trainer: L.Trainer, module: Any, *args: Any) -> None:
            if args[-1] == 0:  # batch_idx
                rates = [m.drop_prob for m in module.model.modules() if isinstance(m, DropPath)]
                seen.append(rates)

    task = tiny_task(drop_path_warmup_epochs=1, mixup=None)
    fit(task, tmp_path, epochs=2, limit_val_batches=0, callbacks=[Record()])
    assert len(seen) == 2 and seen[0] and all(rate == 0 for rate in seen[0])
    assert max(seen[1]) == pytest.approx(0.1) and min(seen[1]) > 0


def test_optimizer_groups_spare_1d_params_class_token_and_pos_embeds() -> None:
    task = tiny_task()
    groups = {g["name"]: g for g in param_groups(task.model, 1e-3, 0.05)}
    names = {id(p): n for n, p in task.model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["lr1_no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["lr1_decay"]["params"]}
    assert {"cls_token", "pos_embed1", "pos_embed4", "head.bias", "norm.weight"} <= no_decay
    assert all(task.model.get_parameter(n).ndim > 1 for n in decay)
    assert "head.weight" in decay and groups["lr1_no_decay"]["weight_decay"] == 0


def test_mixup_settings() -> None:
    mixup = _make_mixup(
        {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "label_smoothing": 0.1}, num_classes=10
    )
    assert isinstance(mixup, Mixup) and mixup.cutmix_alpha == 1.0 and mixup.label_smoothing == 0.1
    assert _make_mixup({"mixup_alpha": 0.0, "cutmix_alpha": 0.0}, 10) is None
    assert _make_mixup(None, 10) is None


# ------------------------------------------------------------------------------ configs


def _config(make_config: Callable[..., DictConfig], *overrides: str, **kw: Any) -> DictConfig:
    return make_config(list(overrides), **kw)


def _runnable(cfg: DictConfig) -> DictConfig:
    """What `@hydra.main` hands the entry points: the config without its `hydra` node."""
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def test_imagenet_recipe_is_the_paper_recipe(make_config: Callable[..., DictConfig]) -> None:
    cfg = _config(make_config, "data=imagenet")
    task, data = cfg.task, cfg.data
    assert cfg.trainer.max_epochs == 300 and data.loader.batch_size == 128
    assert data.transforms.image_size == 224
    assert task.optimizer.name == "adamw" and task.optimizer.lr == 5e-4
    assert task.optimizer.weight_decay == 0.05 and task.lr_base_batch_size == 512
    # The release's timm cosine: per epoch, warm-up from 1e-6, floor 1e-5, whatever the batch.
    assert task.scheduler.per_epoch and task.scheduler.epoch_lag == 1
    assert (task.scheduler.warmup_lr, task.scheduler.min_lr) == (1e-6, 1e-5)
    assert task.scheduler.name == "cosine" and task.scheduler.warmup_epochs == 5
    assert (task.mixup.mixup_alpha, task.mixup.cutmix_alpha) == (0.8, 1.0)
    assert task.mixup.label_smoothing == 0.1
    assert data.transforms.train.auto_augment == "rand-m9-mstd0.5-inc1"
    assert data.transforms.train.re_prob == 0.25
    assert data.transforms.train.interpolation == "bicubic"
    assert data.repeated_aug == 3 and data.transforms.eval.crop_pct == 0.875
    assert cfg.backbone.drop_path_rate == 0.1 and cfg.trainer.gradient_clip_val is None


def test_medium_and_large_clip_and_drop_more(make_config: Callable[..., DictConfig]) -> None:
    for name in ("pvt_medium", "pvt_large"):
        cfg = _config(make_config, "data=imagenet", f"backbone={name}")
        assert cfg.backbone.drop_path_rate == 0.3 and cfg.trainer.gradient_clip_val == 1.0


# --------------------------------------------------------------------------- evaluation


def test_evaluate_a_checkpoint(make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    """Train two steps on shapes, then score the last checkpoint as `src/eval.py` does."""
    train_cfg = _config(
        make_config,
        "trainer.max_steps=2",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=1",
        "trainer.num_sanity_val_steps=0",
        "data.loader.num_workers=0",
    )
    pipeline.train(_runnable(train_cfg))
    ckpt = Path(train_cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert ckpt.is_file() and (Path(train_cfg.paths.output_dir) / "backbone.pth").is_file()
    eval_cfg = _config(
        make_config,
        f"ckpt_path={ckpt}",
        "trainer.limit_val_batches=2",
        "data.loader.num_workers=0",
        config_name="eval",
    )
    metrics = pipeline.evaluate(_runnable(eval_cfg))
    assert {"val/acc1", "val/acc5", "val/loss"} <= set(metrics)

    # compile=true: the same scores from the graph compiled with the weights frozen in.
    with open_dict(eval_cfg):
        eval_cfg.compile = True
    compiled = pipeline.evaluate(eval_cfg)
    assert compiled.keys() == metrics.keys()
    for name, value in metrics.items():
        assert compiled[name] == pytest.approx(value, rel=1e-4, abs=1e-5), name


def test_released_weights_keep_their_1000_class_head(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """`backbone.pretrained=pvt_tiny.pth` on a 1000-class data set keeps the file's classifier."""
    release = create_backbone("pvt_tiny", features_only=False, num_classes=1000)
    path = tmp_path / "pvt_tiny.pth"
    torch.save(release.state_dict(), path)
    cfg = _config(
        make_config,
        f"backbone.pretrained={path}",
        "data=imagenet",
        config_name="eval",
    )
    model = pipeline.build_model(cfg.backbone, cfg.head, cfg.data.num_classes)
    assert torch.equal(model.head.weight, release.head.weight)
    assert torch.equal(model.cls_token, release.cls_token)


def test_eval_of_a_released_file_on_an_image_folder_matches_the_release(
    make_config: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """`src/eval.py backbone.pretrained=pvt_tiny.pth data=imagenet data.root=...` on a folder
    with only val/ scores the release's own forward pass (release layout, nested under `model`)."""
    from hydra.utils import instantiate

    from tests.models import release_reference as release

    rng = np.random.default_rng(0)
    root = tmp_path / "imagenet"
    for c in range(NUM_CLASSES):
        for i in range(3):
            path = root / "val" / f"n0{c}" / f"{i}.JPEG"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(path)
    weights = release.random_state_dict(
        release.release_layout(release.DEPTHS["pvt_tiny"], num_classes=NUM_CLASSES)
    )
    torch.save({"model": weights}, tmp_path / "pvt_tiny.pth")
    cfg = _runnable(
        _config(
            make_config,
            f"backbone.pretrained={tmp_path / 'pvt_tiny.pth'}",
            "data=imagenet",
            f"data.root={root}",
            f"data.num_classes={NUM_CLASSES}",
            "data.transforms.image_size=64",
            "data.loader.num_workers=0",
            config_name="eval",
        )
    )
    metrics = pipeline.evaluate(cfg)

    data = instantiate(cfg.data)
    data.setup("validate")
    val = data.dataset("val")
    images, labels = zip(*(val[i] for i in range(len(val))), strict=True)
    logits = release.forward(weights, torch.stack(images))
    labels = torch.tensor(labels)
    expected_top1 = (logits.argmax(1) == labels).float().mean().item()
    assert metrics["val/acc1"] == pytest.approx(expected_top1)
    assert metrics["val/loss"] == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-4)
    with pytest.raises(ImageFolderError, match="no train/ folder"):
        data.dataset("train")
