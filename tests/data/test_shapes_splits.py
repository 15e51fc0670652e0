"""The shapes test split: its own scenes, read by every kind's test loader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pvtlab.data.shapes import ensure_shapes, make_settings, shapes_datamodule

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TINY = {"image_size": 48, "train_images": 16, "val_images": 8}
# Where each kind writes its val and test images, relative to the generated folder.
IMAGE_DIRS = {
    "classification": ("val", "test"),
    "detection": ("val2017", "test2017"),
    "segmentation": ("images/validation", "images/test"),
}


def _digests(folder: Path) -> set[str]:
    return {hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*.jpg")}


def test_test_count_follows_val_unless_set() -> None:
    assert make_settings("segmentation", val_images=12).test_images == 12
    assert make_settings("segmentation", val_images=12, test_images=5).test_images == 5
    with pytest.raises(ValueError, match="test_images=0"):
        make_settings("classification", test_images=0)


@pytest.mark.parametrize("kind", sorted(IMAGE_DIRS))
def test_test_scenes_are_not_val_scenes(tmp_path: Path, kind: str) -> None:
    folder = ensure_shapes(tmp_path, kind, **TINY, test_images=16)
    val_dir, test_dir = (folder / name for name in IMAGE_DIRS[kind])
    val, test = _digests(val_dir), _digests(test_dir)
    assert len(val) == 8 and len(test) == 16
    assert not val & test
    assert not test & _digests(folder / IMAGE_DIRS[kind][0].replace("val", "train"))


def _test_loader_files(kind: str, datamodule: object) -> list[Path]:
    datamodule.setup("test")
    dataset = datamodule.test_dataloader().dataset
    if kind == "detection":
        return [dataset.image_dir / image["file_name"] for image in dataset.coco.dataset["images"]]
    return [Path(path) for path, _ in dataset.samples]


@pytest.mark.parametrize("kind", sorted(IMAGE_DIRS))
def test_test_dataloader_reads_the_test_split(tmp_path: Path, kind: str) -> None:
    datamodule = shapes_datamodule(kind, tmp_path, generator={**TINY, "test_images": 16})
    files = _test_loader_files(kind, datamodule)
    test_dir = datamodule.root / IMAGE_DIRS[kind][1]
    assert len(files) == 16
    assert all(path.is_relative_to(test_dir) for path in files)
