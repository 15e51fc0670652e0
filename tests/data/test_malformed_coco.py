"""Malformed COCO files are errors naming the file and the record (what tests/data/test_coco.py
does not already cover: missing keys, duplicate ids, NaN boxes). Image-folder faults (empty class
folder, non-image and unreadable files) are covered in tests/data/test_imagefolder.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pvtlab.data.coco import CocoDetection, CocoFormatError
from tests.data.test_coco import CATEGORIES, _ann, write_coco


@pytest.mark.parametrize("key", ["id", "image_id", "category_id", "bbox"])
def test_annotation_missing_a_key_is_named(key: str, tmp_path: Path) -> None:
    record = _ann(21, 1, [1, 1, 5, 5])
    del record[key]
    image_dir, ann_file = write_coco(tmp_path, [_ann(20, 1, [2, 2, 4, 4]), record])
    with pytest.raises(CocoFormatError) as error:
        CocoDetection(image_dir, ann_file)
    assert str(ann_file) in str(error.value)
    assert "annotation record #1" in str(error.value) and repr(key) in str(error.value)


def test_image_missing_a_key_is_named(tmp_path: Path) -> None:
    images = [{"id": 1, "file_name": "1.jpg", "width": 64}]
    image_dir, ann_file = write_coco(tmp_path, [], images=images, pictures={"1.jpg": None})
    with pytest.raises(CocoFormatError, match=r"image record .*'id': 1.* lacks \['height'\]"):
        CocoDetection(image_dir, ann_file)


def test_category_not_in_categories_is_named(tmp_path: Path) -> None:
    image_dir, ann_file = write_coco(tmp_path, [_ann(30, 2, [1, 1, 5, 5], cat=5)])
    with pytest.raises(CocoFormatError, match=r"instances.json: annotation 30 \(image 2\).*5"):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize("value", ["NaN", "Infinity"])
def test_box_with_nan_is_named(value: str, tmp_path: Path) -> None:
    image_dir, ann_file = write_coco(
        tmp_path, [_ann(40, 1, [1, 1, 5, 5]), _ann(41, 3, [1, 1, 5, 5])]
    )
    # json.dumps writes NaN / Infinity literals, which Python's json (and real files) may hold.
    text = ann_file.read_text()
    data = json.loads(text)
    data["annotations"][1]["bbox"][2] = float(value.replace("Infinity", "inf"))
    ann_file.write_text(json.dumps(data))
    with pytest.raises(CocoFormatError, match=r"annotation 41 \(image 3\).*NaN or infinite"):
        CocoDetection(image_dir, ann_file)


@pytest.mark.parametrize("field", ["images", "annotations", "categories"])
def test_duplicate_ids_are_named(field: str, tmp_path: Path) -> None:
    images = [{"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 48} for i in (1, 2, 3)]
    annotations = [_ann(50, 1, [1, 1, 5, 5]), _ann(51, 2, [1, 1, 5, 5])]
    categories = list(CATEGORIES)
    if field == "images":
        images[2] = {**images[2], "id": 2}
    elif field == "annotations":
        annotations[1]["id"] = 50
    else:
        categories = [*categories, {"id": 3, "name": "three again"}]
    image_dir, ann_file = write_coco(tmp_path, annotations, images=images, categories=categories)
    with pytest.raises(CocoFormatError, match=rf"{field} id\(s\) \[\d+\] occur more than once"):
        CocoDetection(image_dir, ann_file)
