"""The shapes generator: determinism, the three on-disk formats, and the cache's life cycle."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from scipy import ndimage

from pvtlab.data import shapes
from pvtlab.data.shapes import (
    SHAPES_CLASSES,
    ShapesSettings,
    cache_problem,
    ensure_shapes,
    make_settings,
    mask_to_polygons,
    sample_scene,
)

# pycocotools' decode predates numpy 2's copy keyword.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# Small enough that every kind generates in well under a second.
TINY = {"image_size": 48, "train_images": 16, "val_images": 8}


def _tiny(kind: str) -> ShapesSettings:
    return make_settings(kind, **TINY)


def test_scenes_are_a_function_of_the_seed() -> None:
    settings = _tiny("detection")
    a = sample_scene(np.random.default_rng(7), settings)
    b = sample_scene(np.random.default_rng(7), settings)
    c = sample_scene(np.random.default_rng(8), settings)
    assert np.array_equal(a.image, b.image)
    assert [i.category for i in a.instances] == [i.category for i in b.instances]
    assert all(
        np.array_equal(x.coverage, y.coverage)
        for x, y in zip(a.instances, b.instances, strict=True)
    )
    assert not np.array_equal(a.image, c.image)


def test_generated_files_are_identical_across_runs(tmp_path: Path) -> None:
    first = ensure_shapes(tmp_path / "a", "detection", **TINY)
    second = ensure_shapes(tmp_path / "b", "detection", **TINY)
    for name in ("annotations/instances_val2017.json", "val2017/000000000003.jpg"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_classification_layout_is_balanced(tmp_path: Path) -> None:
    folder = ensure_shapes(tmp_path, "classification", **TINY)
    for split, count in (("train", 16), ("val", 8)):
        class_dirs = sorted(p.name for p in (folder / split).iterdir())
        assert class_dirs == sorted(SHAPES_CLASSES)
        sizes = [len(list((folder / split / c).glob("*.jpg"))) for c in class_dirs]
        assert sizes == [count // len(SHAPES_CLASSES)] * len(SHAPES_CLASSES)
    image = Image.open(next((folder / "train" / "star").glob("*.jpg")))
    assert image.size == (48, 48) and image.mode == "RGB"


def test_detection_is_valid_coco(tmp_path: Path) -> None:
    folder = ensure_shapes(tmp_path, "detection", image_size=96, train_images=4, val_images=12)
    coco = COCO(str(folder / "annotations" / "instances_val2017.json"))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES_CLASSES)
    assert coco.getCatIds() == list(range(1, len(SHAPES_CLASSES) + 1))
    assert len(coco.getImgIds()) == 12
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) >= 12  # several objects per image on average
    for ann in anns:
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0 and x + w <= 96 and y + h <= 96
        assert ann["iscrowd"] == 0 and ann["area"] > 0
        assert all(len(poly) >= 6 and len(poly) % 2 == 0 for poly in ann["segmentation"])
        # The polygons describe the annotated area and lie inside the box.
        mask = coco.annToMask(ann)
        assert abs(int(mask.sum()) - ann["area"]) <= 0.25 * ann["area"] + 4
        ys, xs = np.nonzero(mask)
        assert xs.min() >= x - 1 and xs.max() <= x + w and ys.min() >= y - 1 and ys.max() <= y + h
    for image in coco.loadImgs(coco.getImgIds()):
        assert (folder / "val2017" / image["file_name"]).is_file()


def test_segmentation_label_maps(tmp_path: Path) -> None:
    folder = ensure_shapes(tmp_path, "segmentation", **TINY)
    images = sorted((folder / "images" / "validation").glob("*.jpg"))
    labels = sorted((folder / "annotations" / "validation").glob("*.png"))
    assert [p.stem for p in images] == [p.stem for p in labels] and len(labels) == 8
    values = set()
    for path in labels:
        label = Image.open(path)
        assert label.mode == "L" and label.size == (48, 48)
        values |= set(np.unique(np.asarray(label)).tolist())
    assert 0 in values and values <= set(range(len(SHAPES_CLASSES) + 1)) and len(values) > 2


def test_dense_scenes_agree_across_formats() -> None:
    """Visible masks are disjoint, hole-free, and their polygons decode back to them."""
    settings = make_settings("detection", image_size=128)
    for index in range(6):
        scene = shapes.dense_scene(settings, "detection", 0, index)
        assert len(scene.instances) >= 1
        label = scene.label_map()
        total = np.zeros(label.shape, int)
        for inst in scene.instances:
            mask = inst.mask
            total += mask
            assert (label[mask] == inst.category + 1).all()
            assert not (ndimage.binary_fill_holes(mask) & ~mask).any()
            rle = mask_util.merge(mask_util.frPyObjects(mask_to_polygons(inst.coverage), 128, 128))
            decoded = mask_util.decode(rle).astype(bool)
            iou = (decoded & mask).sum() / (decoded | mask).sum()
            assert iou > 0.85, (index, inst.category, iou)
        assert total.max() <= 1


def test_mask_to_polygons_of_a_square() -> None:
    coverage = np.zeros((20, 20), np.float32)
    coverage[5:15, 4:12] = 1
    (polygon,) = mask_to_polygons(coverage)
    xy = np.array(polygon).reshape(-1, 2)
    assert len(xy) <= 8  # the staircase of a traced boundary is simplified away
    assert xy[:, 0].min() >= 3.5 and xy[:, 0].max() <= 12.5
    assert xy[:, 1].min() >= 4.5 and xy[:, 1].max() <= 15.5


def test_settings_are_checked() -> None:
    with pytest.raises(TypeError, match="unknown shapes generator setting"):
        make_settings("classification", image_sise=64)
    with pytest.raises(ValueError, match="kind='points'"):
        ensure_shapes("/nonexistent", "points")
    with pytest.raises(ValueError, match="scale"):
        make_settings("classification", scale=(0.9, 0.3))
    with pytest.raises(ValueError, match="polarity='dark'"):
        make_settings("classification", polarity="dark")


def test_light_polarity_draws_shapes_brighter_than_everything_else() -> None:
    """Every labelled pixel is lighter than the layers around it; the layout is still random."""
    settings = make_settings("classification", image_size=64, polarity="light", patterned=0.0)
    gaps = []
    for index in range(16):
        scene, _ = shapes.classification_scene(settings, 0, index)
        inside = np.zeros(scene.image.shape[:2], bool)
        for inst in scene.instances:
            inside |= inst.coverage >= 0.99
        outside = ~ndimage.binary_dilation(inside, iterations=2)
        luma = scene.image.astype(np.float32).mean(-1) / 255
        gaps.append(np.median(luma[inside]) - np.median(luma[outside]))
    assert min(gaps) > 0.2, gaps
    # "any" is the default and keeps the scenes written before polarity existed.
    assert make_settings("classification").polarity == "any"


# ------------------------------------------------------------------------------------ cache


@pytest.fixture
def cached(tmp_path: Path) -> Path:
    return ensure_shapes(tmp_path, "classification", **TINY)


def _a_file(folder: Path) -> Path:
    return next((folder / "train" / "circle").glob("*.jpg"))


def test_intact_cache_is_reused(cached: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("regenerated an intact cache")

    monkeypatch.setattr(shapes, "_generate", fail)
    assert ensure_shapes(cached.parent, "classification", **TINY) == cached


@pytest.mark.parametrize("damage", ["delete_file", "truncate_file", "manifest", "no_folder"])
def test_damaged_cache_is_regenerated(cached: Path, damage: str) -> None:
    victim = _a_file(cached)
    original = victim.read_bytes()
    if damage == "delete_file":
        victim.unlink()
    elif damage == "truncate_file":
        victim.write_bytes(original[:100])
    elif damage == "manifest":
        (cached / shapes.MANIFEST).write_text("{not json")
    else:
        import shutil

        shutil.rmtree(cached)
    assert cache_problem(cached, "classification", _tiny("classification")) is not None
    ensure_shapes(cached.parent, "classification", **TINY)
    assert cache_problem(cached, "classification", _tiny("classification")) is None
    assert victim.read_bytes() == original


def test_older_generator_version_is_regenerated(
    cached: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = cached / "train" / "stale.txt"
    marker.write_text("left by an older generator")
    monkeypatch.setattr(shapes, "GENERATOR_VERSION", shapes.GENERATOR_VERSION + 1)
    assert "generator version" in cache_problem(cached, "classification", _tiny("classification"))
    ensure_shapes(cached.parent, "classification", **TINY)
    assert not marker.exists()
    manifest = json.loads((cached / shapes.MANIFEST).read_text())
    assert manifest["generator_version"] == shapes.GENERATOR_VERSION
    # No temporary or old folders are left behind.
    assert [p.name for p in cached.parent.iterdir() if p.is_dir()] == [cached.name]


def test_other_settings_get_their_own_folder(cached: Path) -> None:
    before = json.loads((cached / shapes.MANIFEST).read_text())
    other = ensure_shapes(cached.parent, "classification", **{**TINY, "val_images": 16})
    assert other != cached and other.parent == cached.parent
    assert len(list((other / "val").rglob("*.jpg"))) == 16
    # The first setting's files are untouched: a run still reading them is not disturbed.
    assert json.loads((cached / shapes.MANIFEST).read_text()) == before
    assert cache_problem(cached, "classification", _tiny("classification")) is None
    assert ensure_shapes(cached.parent, "classification", **TINY) == cached


def _ensure_and_count(root: str, counter: str) -> None:
    original = shapes._generate

    def counting(*args: object, **kwargs: object) -> None:
        with Path(counter).open("a") as handle:
            handle.write("generated\n")
        original(*args, **kwargs)

    shapes._generate = counting
    ensure_shapes(root, "segmentation", **TINY)


def test_concurrent_processes_generate_once(tmp_path: Path) -> None:
    counter = tmp_path / "count.txt"
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_ensure_and_count, args=(str(tmp_path / "root"), str(counter)))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert [w.exitcode for w in workers] == [0, 0, 0]
    assert counter.read_text().count("generated") == 1
    settings = _tiny("segmentation")
    folder = shapes.cache_folder(tmp_path / "root", "segmentation", settings)
    assert cache_problem(folder, "segmentation", settings) is None
