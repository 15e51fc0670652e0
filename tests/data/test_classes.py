"""Data sets describe their classes: read from the data, checked against data.num_classes,
recorded in checkpoints, and matched by name when a trained model is evaluated on other data."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict
from PIL import Image

from pvtlab import pipeline
from pvtlab.config import ConfigError
from pvtlab.data.classes import label_mapping, read_class_list
from pvtlab.data.coco import CocoDataModule, CocoFormatError
from pvtlab.data.imagefolder import ImageFolderDataModule
from pvtlab.data.segmentation import ADE20K_CLASSES, ADE20KDataModule
from pvtlab.data.shapes import SHAPES_CLASSES

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
# COCO category ids need not be contiguous: labels 0..19 stand for these.
VOC_CATEGORY_IDS = [3 * i + 2 for i in range(len(VOC_CLASSES))]
SIZE = 64


def _image(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def voc_coco(root: Path, images: int = 2) -> Path:
    """A 20-category COCO-layout set: `images` scenes a split, three boxes each."""
    for split in ("train2017", "val2017"):
        records, annotations = [], []
        for index in range(images):
            image_id = index + 1
            _image(root / split / f"{image_id:06d}.jpg", seed=image_id)
            records.append(
                {"id": image_id, "file_name": f"{image_id:06d}.jpg", "width": SIZE, "height": SIZE}
            )
            for k in range(3):
                x, y = 4 + 18 * k, 8 + 10 * k
                annotations.append(
                    {
                        "id": len(annotations) + 1,
                        "image_id": image_id,
                        "category_id": VOC_CATEGORY_IDS[(index * 3 + k) % len(VOC_CLASSES)],
                        "bbox": [x, y, 16, 20],
                        "area": 320.0,
                        "iscrowd": 0,
                        "segmentation": [[x, y, x + 16, y, x + 16, y + 20, x, y + 20]],
                    }
                )
        categories = [
            {"id": i, "name": n} for i, n in zip(VOC_CATEGORY_IDS, VOC_CLASSES, strict=True)
        ]
        target = root / "annotations" / f"instances_{split}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            json.dumps({"images": records, "annotations": annotations, "categories": categories})
        )
    return root


def voc_ade(root: Path, images: int = 2, class_list: str = "classes.txt") -> Path:
    """A 20-class ADE20K-layout set (label 0 unlabelled, 1..20 the classes) with its class list."""
    for split in ("training", "validation"):
        for index in range(images):
            stem = f"{index + 1:06d}"
            _image(root / "images" / split / f"{stem}.jpg", seed=index)
            label = np.zeros((SIZE, SIZE), np.uint8)
            for k in range(4):
                label[16 * k : 16 * (k + 1), :] = (index * 4 + k) % len(VOC_CLASSES) + 1
            label[:, :8] = 0
            path = root / "annotations" / split / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(label, mode="L").save(path)
    if class_list == "classes.txt":
        (root / "classes.txt").write_text("# VOC\n" + "\n".join(VOC_CLASSES) + "\n")
    elif class_list == "manifest.json":
        (root / "manifest.json").write_text(json.dumps({"classes": list(VOC_CLASSES)}))
    return root


# ------------------------------------------------------------------ the data say their classes


def test_coco_classes_are_the_training_json_categories(tmp_path: Path) -> None:
    data = CocoDataModule(voc_coco(tmp_path), loader={"num_workers": 0})
    assert data.num_classes == 20
    assert data.class_names == VOC_CLASSES
    assert data.category_ids == VOC_CATEGORY_IDS
    data.setup("fit")
    with pytest.raises(
        ConfigError, match=r"data.num_classes=80 but .*instances_train2017.json has 20 categories"
    ):
        CocoDataModule(tmp_path, num_classes=80).setup("fit")


def test_coco_splits_must_list_the_same_categories(tmp_path: Path) -> None:
    voc_coco(tmp_path)
    val = tmp_path / "annotations" / "instances_val2017.json"
    document = json.loads(val.read_text())
    document["categories"][0]["name"] = "airplane"
    val.write_text(json.dumps(document))
    with pytest.raises(CocoFormatError, match=r"categories of .*instances_val2017.json .* differ"):
        CocoDataModule(tmp_path).setup("fit")


@pytest.mark.parametrize("class_list", ["classes.txt", "manifest.json"])
def test_segmentation_classes_come_from_the_class_list(tmp_path: Path, class_list: str) -> None:
    data = ADE20KDataModule(voc_ade(tmp_path, class_list=class_list))
    assert data.num_classes == 20 and data.class_names == VOC_CLASSES
    assert data.category_ids is None
    assert read_class_list(tmp_path)[1].name == class_list


def test_a_150_class_override_on_a_20_class_set_is_an_error(tmp_path: Path) -> None:
    voc_ade(tmp_path)
    with pytest.raises(ConfigError) as error:
        ADE20KDataModule(tmp_path, num_classes=150)
    message = str(error.value)
    assert "data.num_classes=150" in message and "has 20 classes" in message
    assert str(tmp_path / "classes.txt") in message


def test_a_segmentation_set_without_a_class_list_needs_num_classes(tmp_path: Path) -> None:
    voc_ade(tmp_path, class_list="none")
    with pytest.raises(ConfigError, match=r"classes.txt .* or set data.num_classes"):
        ADE20KDataModule(tmp_path)
    assert ADE20KDataModule(tmp_path, num_classes=20).class_names[3] == "class_3"
    # ADE20K's release ships its class table: its 150 names, not guessed from the count.
    (tmp_path / "objectInfo150.txt").write_text("Idx\tRatio\tTrain\tVal\tName\n")
    assert ADE20KDataModule(tmp_path).class_names == ADE20K_CLASSES


def test_image_folder_num_classes_is_checked(tmp_path: Path) -> None:
    for name in ("b", "a"):
        _image(tmp_path / "val" / name / "0.png", seed=0)
    data = ImageFolderDataModule(tmp_path)
    assert data.class_names == ("a", "b") and data.category_ids is None
    with pytest.raises(ConfigError, match=r"data.num_classes=5 but .* has 2 class folders"):
        ImageFolderDataModule(tmp_path, num_classes=5)


# ------------------------------------------------------------------ matching a model's classes


def test_label_mapping_by_name_by_index_and_by_count(caplog: pytest.LogCaptureFixture) -> None:
    model = ["cat", "dog", "fox", "owl"]
    with caplog.at_level(logging.WARNING, logger="pvtlab.data.classes"):
        assert label_mapping(["dog", "owl"], model, 4, "val/") == [1, 3]
    assert "val/ holds 2 of the model's 4 classes: they are scored by name" in caplog.text
    with pytest.raises(ConfigError, match=r"class\(es\) \['emu'\] that the model does not know"):
        label_mapping(["dog", "emu"], model, 4, "val/")
    # A model without class names (a released file): folders named by class index, or all classes.
    assert label_mapping(["2", "10"], None, 1000, "val/") == [2, 10]
    assert label_mapping(["a", "b", "c"], None, 3, "val/") == [0, 1, 2]
    with pytest.raises(ConfigError, match="records no class names"):
        label_mapping(["n01440764", "n01443537"], None, 1000, "val/")


def test_segmentation_labels_follow_the_model(tmp_path: Path) -> None:
    data = ADE20KDataModule(voc_ade(tmp_path), loader={"num_workers": 0})
    # A model trained on the classes in reverse order: every label map follows it.
    data.use_model_classes(list(reversed(VOC_CLASSES)), 20)
    label = data.dataset("val").load(0)[1]
    stored = np.asarray(Image.open(tmp_path / "annotations" / "validation" / "000001.png"))
    expected = np.where(stored == 0, 255, 20 - stored.astype(np.int64))
    assert np.array_equal(label.numpy(), expected)


# ------------------------------------------------------------------ runs that read them


def _quiet(overrides: list[str]) -> list[str]:
    return [
        *overrides,
        "data.loader.num_workers=0",
        "backbone.img_size=64",
        "trainer.max_epochs=1",
        "trainer.num_sanity_val_steps=0",
        "trainer.enable_model_summary=false",
        "test=false",
        "logger=none",
        "callbacks.prediction_panels=null",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "callbacks.learning_rate_monitor=null",
    ]


def _runnable(cfg: DictConfig) -> DictConfig:
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def _saved_model_config(cfg: DictConfig) -> dict:
    path = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    return torch.load(path, map_location="cpu", weights_only=True)["hyper_parameters"][
        "model_config"
    ]


@pytest.mark.slow  # a RetinaNet step and COCOeval: this file's one slow test
def test_a_20_category_coco_set_trains_without_num_classes(
    tmp_path: Path, make_config: Callable[..., DictConfig]
) -> None:
    root = voc_coco(tmp_path / "voc")
    cfg = make_config(
        _quiet(
            [
                "task=detection",
                "data=coco",
                f"data.root={root}",
                "data.transforms.train_short_side=[64]",
                "data.transforms.max_size=64",
                "data.transforms.test_short_side=64",
            ]
        )
    )
    assert cfg.data.num_classes is None
    metrics = pipeline.train(_runnable(cfg))
    assert "val/mAP" in metrics
    saved = _saved_model_config(cfg)
    assert saved["num_classes"] == 20
    assert saved["class_names"] == list(VOC_CLASSES)
    assert saved["category_ids"] == VOC_CATEGORY_IDS


def test_a_20_class_ade_set_trains_without_num_classes_and_validates(
    tmp_path: Path, make_config: Callable[..., DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    root = voc_ade(tmp_path / "voc")
    cfg = make_config(
        _quiet(
            [
                "task=segmentation",
                "data=ade20k",
                f"data.root={root}",
                "trainer.max_steps=1",
                "data.loader.batch_size=2",
                "data.transforms.crop_size=[64,64]",
                "data.transforms.scale=[256,64]",
                "data.transforms.test_scale=[256,64]",
            ]
        )
    )
    assert cfg.data.num_classes is None and cfg.trainer.val_check_interval == 4000
    with caplog.at_level(logging.WARNING, logger="pvtlab.pipeline"):
        metrics = pipeline.train(_runnable(cfg))
    # ADE20K's 4000-iteration interval is fitted to the 1-step run: it validates at its end.
    assert "val_check_interval=4000 does not end on this run's last of 1 steps" in caplog.text
    assert "val/mIoU" in metrics
    saved = _saved_model_config(cfg)
    assert saved["class_names"] == list(VOC_CLASSES) and saved["category_ids"] is None
    rows = (Path(cfg.paths.output_dir) / "per_class_iou_val.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:21]] == list(VOC_CLASSES)


def test_a_classifier_scores_a_folder_of_some_of_its_classes_by_name(
    tmp_path: Path, make_config: Callable[..., DictConfig], caplog: pytest.LogCaptureFixture
) -> None:
    cfg = make_config(
        _quiet(
            [
                "data.generator.train_images=16",
                "data.generator.val_images=16",
                "data.loader.batch_size=8",
            ]
        )
    )
    pipeline.train(_runnable(cfg))
    checkpoint = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    # An image-folder classifier's labels are its class folders in sorted order.
    model_names = sorted(SHAPES_CLASSES)
    assert _saved_model_config(cfg)["class_names"] == model_names

    # Three of the eight classes, copied from the shapes validation images.
    shapes_val = pipeline.build_datamodule(cfg).root / "val"
    subset = tmp_path / "subset"
    chosen = ("star", "circle", "hexagon")
    for name in chosen:
        shutil.copytree(shapes_val / name, subset / "val" / name)

    def evaluate(root: Path) -> dict[str, float]:
        eval_cfg = make_config(
            [
                "data=imagenet",
                f"data.root={root}",
                f"ckpt_path={checkpoint}",
                "data.loader.num_workers=0",
                "data.loader.batch_size=8",
                "data.transforms.image_size=64",
                "data.transforms.eval.crop_pct=1.0",
                "trainer.enable_model_summary=false",
            ],
            config_name="eval",
        )
        return pipeline.evaluate(_runnable(eval_cfg))

    with caplog.at_level(logging.WARNING, logger="pvtlab.data.classes"):
        metrics = evaluate(subset)
    assert f"holds 3 of the model's {len(SHAPES_CLASSES)} classes" in caplog.text
    assert 0.0 <= metrics["val/acc1"] <= 1.0
    # The folders are labelled with the model's labels of their names, not their sorted order.
    data = ImageFolderDataModule(subset, loader={"num_workers": 0})
    data.use_model_classes(model_names, len(model_names))
    assert sorted(set(data.dataset("val").targets)) == sorted(
        model_names.index(name) for name in chosen
    )
    assert data.labels != [0, 1, 2]  # sorted positions would be wrong for this subset

    shutil.copytree(shapes_val / "star", subset / "val" / "pentagon")
    with pytest.raises(ConfigError, match=r"\['pentagon'\] that the model does not know"):
        evaluate(subset)


def test_datamodule_errors_print_as_their_message(
    tmp_path: Path, make_config: Callable[..., DictConfig]
) -> None:
    cfg = make_config(["task=segmentation", "data=ade20k", f"data.root={tmp_path / 'nowhere'}"])
    with pytest.raises(FileNotFoundError) as error:
        pipeline.build_datamodule(cfg)
    assert str(error.value).startswith(f"data.root={tmp_path / 'nowhere'} does not exist")
    assert "\\n" not in str(error.value) and "InstantiationException" not in str(error.value)
