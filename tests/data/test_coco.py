"""The COCO loader on tiny hand-built COCO files: each real-world case and what it must do."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_util

from pvtlab.config import ConfigError
from pvtlab.data.coco import (
    CategoryMapping,
    CocoDataModule,
    CocoDetection,
    CocoFormatError,
    collate_detection,
    load_coco,
)
from pvtlab.data.detection_transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ToNormalizedFloat,
    detection_transforms,
    pad_images,
    short_side_choices,
)
from pvtlab.evaluation.coco import CocoEvaluator

W, H = 64, 48
CATEGORIES = [{"id": 7, "name": "seven"}, {"id": 3, "name": "three"}]


def _ann(ann_id: int, image_id: int, bbox: list[float], cat: int = 3, **extra: Any) -> dict:
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": cat,
        "bbox": bbox,
        "area": float(bbox[2] * bbox[3]) if len(bbox) == 4 else 0.0,
        "iscrowd": 0,
        **extra,
    }


def write_coco(
    folder: Path,
    annotations: Sequence[dict],
    images: Sequence[dict] | None = None,
    pictures: dict[str, Image.Image | bytes | None] | None = None,
    categories: Sequence[dict] = CATEGORIES,
) -> tuple[Path, Path]:
    """A COCO split in `folder`: images/ and instances.json. `pictures` overrides file contents
    (None: no file); images default to ids 1, 2, 3 of W x H."""
    images = list(
        images or [{"id": i, "file_name": f"{i}.jpg", "width": W, "height": H} for i in (1, 2, 3)]
    )
    pictures = pictures or {}
    image_dir = folder / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for info in images:
        content = pictures.get(info["file_name"], "default")
        path = image_dir / info["file_name"]
        if content is None:
            continue
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, Image.Image):
            content.save(path)
        else:
            Image.new("RGB", (info["width"], info["height"]), (200, 30, 30)).save(path)
    ann_file = folder / "instances.json"
    ann_file.write_text(
        json.dumps(
            {"images": images, "annotations": list(annotations), "categories": list(categories)}
        )
    )
    return image_dir, ann_file


def test_category_ids_map_to_contiguous_labels_and_back() -> None:
    mapping = CategoryMapping((2, 5, 90), ("a", "b", "c"))
    ids = np.array([90, 2, 5, 5])
    labels = mapping.to_labels(ids)
    assert labels.tolist() == [2, 0, 1, 1]
    assert mapping.to_category_ids(labels).tolist() == ids.tolist()
    assert mapping.to_category_ids(torch.tensor([0, 2])).tolist() == [2, 90]
    with pytest.raises(KeyError, match=r"\[4\]"):
        mapping.to_labels([4])
    with pytest.raises(IndexError):
        mapping.to_category_ids([3])


def test_labels_follow_category_id_order(tmp_path: Path) -> None:
    image_dir, ann = write_coco(
        tmp_path, [_ann(1, 1, [1, 1, 10, 10], cat=7), _ann(2, 1, [20, 20, 5, 5], cat=3)]
    )
    data = CocoDetection(image_dir, ann)
    assert data.categories.category_ids == (3, 7)
    assert data.categories.names == ("three", "seven")
    _, target = data[0]
    assert target["labels"].tolist() == [1, 0]
    assert target["labels"].dtype == torch.int64


def test_crowd_left_out_of_training_and_honoured_in_evaluation(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [2, 2, 20, 20]), _ann(2, 1, [30, 10, 30, 30], iscrowd=1)]
    image_dir, ann_file = write_coco(tmp_path, anns)
    data = CocoDetection(image_dir, ann_file, train=True)
    _, target = data[0]
    assert target["boxes"].tolist() == [[2, 2, 22, 22]]
    assert data.stats["crowd_left_out"] == 1
    # A confident detection on the crowd region is ignored by COCOeval, not a false positive.
    evaluator = CocoEvaluator(data.coco, data.categories.category_ids)
    prediction = {
        "boxes": torch.tensor([[30.0, 10, 60, 40], [2, 2, 22, 22]]),
        "scores": torch.tensor([0.9, 0.8]),
        "labels": torch.tensor([0, 0]),
    }
    evaluator.update([prediction], [{"image_id": 1, "orig_size": (H, W), "size": (H, W)}])
    metrics, _ = evaluator.compute()
    assert metrics["mAP"] == pytest.approx(1.0)


def test_empty_images_skipped_in_training_kept_in_evaluation(tmp_path: Path) -> None:
    image_dir, ann = write_coco(tmp_path, [_ann(1, 2, [5, 5, 10, 10])])
    train = CocoDetection(image_dir, ann, train=True)
    assert train.image_ids == [2]
    assert train.stats["empty_images_skipped"] == 2
    kept = CocoDetection(image_dir, ann, train=True, skip_empty=False)
    assert kept.image_ids == [1, 2, 3]
    evaluation = CocoDetection(image_dir, ann, with_masks=True)
    assert evaluation.image_ids == [1, 2, 3]
    _, target = evaluation[0]
    assert target["boxes"].shape == (0, 4)
    assert target["labels"].shape == (0,)
    assert target["masks"].shape == (0, H, W)


def test_degenerate_and_outside_boxes_are_clipped_or_dropped_and_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    anns = [
        _ann(1, 1, [-5, 10, 20, 10]),  # sticks out left: clipped to x 0..15
        _ann(2, 1, [50, 40, 30, 30]),  # sticks out right and bottom: clipped
        _ann(3, 1, [10, 10, 0, 5]),  # zero width: dropped
        _ann(4, 1, [10, 10, -4, 5]),  # negative width: dropped
        _ann(5, 1, [100, 100, 10, 10]),  # wholly outside: dropped
        _ann(6, 1, [10, 10, 0.5, 8]),  # under min_box_size (1 px): dropped
        _ann(7, 1, [5, 5, 10, 10]),  # fine
    ]
    image_dir, ann_file = write_coco(tmp_path, anns)
    with caplog.at_level(logging.INFO, logger="pvtlab.data.coco"):
        data = CocoDetection(image_dir, ann_file, train=True)
    _, target = data[0]
    assert target["boxes"].tolist() == [[0, 10, 15, 20], [50, 40, 64, 48], [5, 5, 15, 15]]
    assert data.stats["boxes_clipped"] == 2
    assert data.stats["boxes_dropped"] == 4
    assert "boxes clipped 2" in caplog.text and "boxes dropped 4" in caplog.text


def test_bad_category_and_bbox_are_errors_naming_the_annotation(tmp_path: Path) -> None:
    image_dir, ann = write_coco(tmp_path / "a", [_ann(11, 1, [1, 1, 5, 5], cat=99)])
    with pytest.raises(CocoFormatError, match=r"annotation 11 .*category_id 99"):
        CocoDetection(image_dir, ann)
    image_dir, ann = write_coco(tmp_path / "b", [_ann(12, 1, [1, 1, 5])])
    with pytest.raises(CocoFormatError, match=r"annotation 12 .*\[x, y, width, height\]"):
        CocoDetection(image_dir, ann)
    image_dir, ann = write_coco(tmp_path / "c", [_ann(13, 42, [1, 1, 5, 5])])
    with pytest.raises(CocoFormatError, match="annotation 13 refers to image 42"):
        CocoDetection(image_dir, ann)


def test_missing_area_and_iscrowd_are_filled_for_cocoeval(tmp_path: Path) -> None:
    ann = {"id": 1, "image_id": 1, "category_id": 3, "bbox": [1, 2, 4, 5]}
    _, ann_file = write_coco(tmp_path, [ann])
    coco = load_coco(ann_file)
    assert coco.anns[1]["area"] == 20.0
    assert coco.anns[1]["iscrowd"] == 0


def _square_rle(x: int, y: int, size: int, compressed: bool) -> dict:
    mask = np.zeros((H, W), np.uint8)
    mask[y : y + size, x : x + size] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    if compressed:
        return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    # Uncompressed RLE: run lengths in column-major order, starting with zeros.
    flat = mask.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(bounds).tolist()
    if flat[0] == 1:
        runs = [0, *runs]
    return {"size": [H, W], "counts": runs}


def test_polygon_and_rle_masks_decode(tmp_path: Path) -> None:
    anns = [
        _ann(1, 1, [4, 4, 10, 10], segmentation=[[4, 4, 14, 4, 14, 14, 4, 14]]),
        _ann(2, 1, [20, 5, 8, 8], segmentation=_square_rle(20, 5, 8, compressed=True)),
        _ann(
            3, 1, [40, 20, 6, 6], segmentation=_square_rle(40, 20, 6, compressed=False), iscrowd=0
        ),
        _ann(4, 1, [30, 30, 5, 4], segmentation=[]),  # no shape: its box becomes the mask
    ]
    image_dir, ann_file = write_coco(tmp_path, anns)
    data = CocoDetection(image_dir, ann_file, train=True, with_masks=True)
    _, target = data[0]
    masks = target["masks"]
    assert masks.dtype == torch.uint8 and masks.shape == (4, H, W)
    assert masks[0].sum() == pytest.approx(100, abs=15)  # polygon edges rasterize by rule
    assert masks[0, 8, 8] == 1 and masks[0, 30, 30] == 0
    assert masks[1].sum() == 64 and masks[1, 5:13, 20:28].all()
    assert masks[2].sum() == 36 and masks[2, 20:26, 40:46].all()
    assert masks[3].sum() == 20
    assert data.stats["masks_from_boxes"] == 1


def test_grayscale_rgba_cmyk_and_palette_images_become_rgb(tmp_path: Path) -> None:
    pictures = {
        "1.jpg": Image.new("L", (W, H), 128),
        "2.png": Image.new("RGBA", (W, H), (10, 200, 30, 100)),
        "3.jpg": Image.new("CMYK", (W, H), (0, 255, 255, 0)),  # pure red in CMYK
        "4.png": Image.new("P", (W, H), 0),
    }
    images = [
        {"id": i + 1, "file_name": name, "width": W, "height": H} for i, name in enumerate(pictures)
    ]
    image_dir, ann = write_coco(tmp_path, [], images=images, pictures=pictures)
    data = CocoDetection(image_dir, ann)
    gray, rgba, cmyk, palette = (data[i][0] for i in range(4))
    for image in (gray, rgba, cmyk, palette):
        assert image.shape == (3, H, W) and image.dtype == torch.uint8
    assert gray[:, 10, 10].tolist() == [128, 128, 128]
    assert rgba[:, 10, 10].tolist() == [10, 200, 30]
    red = cmyk[:, 10, 10].tolist()
    assert red[0] > 200 and red[1] < 60 and red[2] < 60


def _exif_rotated(width: int, height: int) -> Image.Image:
    """A width x height picture stored with EXIF orientation 6 (display: rotate 90° clockwise)."""
    image = Image.new("RGB", (width, height), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, width // 2, height))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    image.info["exif"] = exif.tobytes()
    return image


def test_exif_rotation_follows_the_json_frame(tmp_path: Path) -> None:
    stored = _exif_rotated(40, 20)
    path = tmp_path / "rot.jpg"
    stored.save(path, exif=stored.info["exif"])
    pictures = {"a.jpg": path.read_bytes(), "b.jpg": path.read_bytes(), "c.jpg": path.read_bytes()}
    images = [
        {"id": 1, "file_name": "a.jpg", "width": 20, "height": 40},  # annotated as displayed
        {"id": 2, "file_name": "b.jpg", "width": 40, "height": 20},  # annotated as stored
        {"id": 3, "file_name": "c.jpg", "width": 33, "height": 33},  # neither
    ]
    image_dir, ann = write_coco(tmp_path, [], images=images, pictures=pictures)
    data = CocoDetection(image_dir, ann)
    displayed, _ = data[0]
    assert displayed.shape == (3, 40, 20)
    # Rotated clockwise, the stored left half (red) is now the top half.
    assert displayed[0, 5, 10] > 200 and displayed[2, 35, 10] > 200
    as_stored, _ = data[1]
    assert as_stored.shape == (3, 20, 40)
    with pytest.raises(CocoFormatError, match=r"c\.jpg.*40x20.*33x33 for image id 3"):
        data[2]


def test_missing_image_is_named_or_skipped_and_counted(tmp_path: Path) -> None:
    image_dir, ann = write_coco(tmp_path, [_ann(1, 2, [1, 1, 5, 5])], pictures={"2.jpg": None})
    with pytest.raises(FileNotFoundError, match=r"2\.jpg.*image id 2.*bad_images=skip"):
        CocoDetection(image_dir, ann)
    data = CocoDetection(image_dir, ann, bad_images="skip")
    assert data.image_ids == [1, 3]
    assert data.stats["missing_images_skipped"] == 1


def test_corrupt_image_is_named_or_skipped(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [1, 1, 5, 5])]
    image_dir, ann = write_coco(tmp_path, anns, pictures={"1.jpg": b"not a jpeg at all"})
    with pytest.raises(CocoFormatError, match=r"1\.jpg \(image id 1 of .*instances\.json\)"):
        CocoDetection(image_dir, ann)[0]
    evaluation = CocoDetection(image_dir, ann, bad_images="skip")
    assert evaluation[0] is None
    images, targets = collate_detection([evaluation[0], evaluation[1]])
    assert len(images) == 1 and int(targets[0]["image_id"]) == 2
    # Training replaces it with the next image, so every step still has a full batch.
    train = CocoDetection(image_dir, ann, train=True, bad_images="skip")
    assert int(train[0][1]["image_id"]) == 2


def test_resize_flip_and_normalize_move_boxes_and_masks_with_the_image(tmp_path: Path) -> None:
    anns = [_ann(1, 1, [4, 8, 10, 20], segmentation=[[4, 8, 14, 8, 14, 28, 4, 28]])]
    image_dir, ann_file = write_coco(tmp_path, anns)
    # Shorter side 48 -> 96 (x2), longer 64 -> 128 under the 200 cap; always flipped.
    transform = detection_transforms([96], max_size=200, flip_prob=1.0)
    data = CocoDetection(image_dir, ann_file, transform, train=True, with_masks=True)
    image, target = data[0]
    assert image.shape == (3, 96, 128) and image.dtype == torch.float32
    assert image.mean().abs() < 3  # normalized, not 0..255
    assert target["boxes"].tolist() == [[128 - 28, 16, 128 - 8, 56]]
    assert target["size"].tolist() == [96, 128] and target["orig_size"].tolist() == [H, W]
    mask = target["masks"][0]
    assert mask.shape == (96, 128) and mask[30, 110] == 1 and mask[30, 20] == 0
    # The longer side cap wins over the shorter side target.
    capped = CocoDetection(image_dir, ann_file, detection_transforms([96], max_size=100))
    assert capped[0][0].shape[-2:] == (75, 100)


def test_normalization_in_one_pass_is_todtype_then_normalize() -> None:
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    torch.manual_seed(0)
    image = tv_tensors.Image(torch.randint(0, 256, (3, 40, 30), dtype=torch.uint8))
    boxes = tv_tensors.BoundingBoxes([[1, 2, 10, 20]], format="XYXY", canvas_size=(40, 30))
    two_steps = v2.Compose(
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    fused, fused_boxes = ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(image, boxes)
    assert isinstance(fused, tv_tensors.Image) and fused.dtype == torch.float32
    torch.testing.assert_close(fused, two_steps(image), atol=1e-5, rtol=0)
    assert torch.equal(fused_boxes, boxes)
    with pytest.raises(TypeError, match="uint8"):
        ToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(tv_tensors.Image(torch.rand(3, 4, 4)))


def test_multi_scale_choices_and_padding_to_32() -> None:
    assert short_side_choices([640, 800], "range") == list(range(640, 801))
    assert short_side_choices([480, 512], "choice") == [480, 512]
    with pytest.raises(ValueError, match="choice"):
        short_side_choices([800], "random")
    batch, padding = pad_images([torch.ones(3, 50, 70), torch.ones(3, 64, 33)])
    assert batch.shape == (2, 3, 64, 96)
    assert padding[0, :50, :70].logical_not().all() and padding[0, 50:].all()
    assert batch[1, :, :64, 33:].abs().sum() == 0


def _coco_root(root: Path) -> None:
    for split in ("train2017", "val2017"):
        image_dir, ann_file = write_coco(
            root / split, [_ann(1, 1, [4, 4, 20, 20]), _ann(2, 2, [30, 10, 10, 10], cat=7)]
        )
        target = root / "annotations" / f"instances_{split}.json"
        target.parent.mkdir(parents=True, exist_ok=True)
        ann_file.rename(target)
        for f in image_dir.iterdir():
            f.rename(root / split / f.name)
        image_dir.rmdir()


def test_datamodule_batches_are_lists_of_images_and_targets(tmp_path: Path) -> None:
    _coco_root(tmp_path)
    dm = CocoDataModule(
        tmp_path,
        loader={"batch_size": 2, "num_workers": 0},
        transforms={"train_short_side": [32, 64], "test_short_side": 48, "max_size": 100},
        num_classes=2,
    )
    dm.setup("fit")
    images, targets = next(iter(dm.train_dataloader()))
    assert isinstance(images, list) and len(images) == 2
    assert {int(t["image_id"]) for t in targets} == {1, 2}
    assert all(min(im.shape[-2:]) in (32, 64) for im in images)
    val_images, val_targets = next(iter(dm.val_dataloader()))
    assert [im.shape[-2:] for im in val_images] == [(48, 64), (48, 64)]
    assert "masks" not in val_targets[0]
    dm.setup("test")
    assert dm.split("test").annotation_file.name == "instances_val2017.json"


def test_datamodule_names_the_expected_layout_and_class_count(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"train2017.*expected COCO layout"):
        CocoDataModule(tmp_path / "nowhere").setup("fit")
    _coco_root(tmp_path)
    with pytest.raises(ConfigError, match=r"data\.num_classes=80 .* 2 categories"):
        CocoDataModule(tmp_path, num_classes=80).setup("validate")
