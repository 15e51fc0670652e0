"""The files `src/predict.py` reads and writes: the pictures an `input=` names, and per kind of
prediction the files its results go to.

- classification: `predictions.csv`, one row per picture: `file`, then `class_<r>` and
  `probability_<r>` for the top-k classes, best first;
- detection: `predictions.json`, a COCO file whose `images` are the pictures (file, size),
  `categories` the training set's (original ids and names) and `annotations` the detections
  (COCO results: `bbox` xywh in the picture's pixels, `score`, RLE `segmentation` for masks), and
  a drawn picture per input under `drawn/`;
- segmentation: a palette PNG of class indices per picture at its own size under `label_maps/`
  (16-bit grey beyond 256 classes), and the picture overlaid with it under `overlays/`.

Output files keep the input's folders below the searched folder, so equal names never collide.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_util
from torchvision.transforms.v2 import functional as TF

from pvtlab.data.images import IMAGE_EXTENSIONS
from pvtlab.inference import ClassNames
from pvtlab.visualization import class_colors, draw_detections, overlay_label_map

__all__ = ["PredictionWriter", "find_images", "prediction_writer"]

GLOB_CHARACTERS = "*?["


def find_images(source: str | os.PathLike[str]) -> tuple[list[Path], Path]:
    """The files an `input=` names, sorted, and the folder output names are relative to.

    A file is taken whatever its extension; a folder gives its image files (`IMAGE_EXTENSIONS`)
    at any depth; a glob pattern (`photos/*.jpg`, `**` for any depth) the files it matches.
    """
    text = os.fspath(source)
    path = Path(text).expanduser()
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")
        )
        return files, path
    parts = path.parts
    first = next((i for i, part in enumerate(parts) if set(part) & set(GLOB_CHARACTERS)), None)
    if first is not None:
        root = Path(*parts[:first]) if first else Path()
        files = sorted(p for p in root.glob(str(Path(*parts[first:]))) if p.is_file())
        return files, root
    raise FileNotFoundError(f"input={text}: no such file or folder, and not a glob pattern")


def relative_name(path: Path, root: Path) -> Path:
    """`path` below `root`, without its suffix (the name its output files take)."""
    try:
        relative = path.resolve().relative_to(root.resolve())
    except ValueError:
        relative = Path(path.name)
    return relative.with_suffix("")


class PredictionWriter(Protocol):
    def add(self, file: Path, name: Path, picture: Image.Image, result: Mapping[str, Any]) -> None:
        """Record the prediction of the picture read from `file`; `name`: its relative name
        without suffix (`relative_name`), which its output files take."""

    def close(self) -> list[Path]:
        """Finish the files; the files and folders written."""


class ClassificationWriter:
    """`predictions.csv`: the top-k class names and probabilities of each picture."""

    def __init__(self, output_dir: Path, top_k: int) -> None:
        self.path = output_dir / "predictions.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("w", newline="")
        self._csv = csv.writer(self._file)
        header = ["file"]
        for rank in range(1, top_k + 1):
            header += [f"class_{rank}", f"probability_{rank}"]
        self._csv.writerow(header)

    def add(self, file: Path, name: Path, picture: Image.Image, result: Mapping[str, Any]) -> None:
        row = [str(file)]
        for class_name, p in zip(result["names"], result["probabilities"].tolist(), strict=True):
            row += [class_name, f"{p:.6f}"]
        self._csv.writerow(row)

    def close(self) -> list[Path]:
        self._file.close()
        return [self.path]


class DetectionWriter:
    """`predictions.json` (COCO) and one drawn picture per input under `drawn/`."""

    def __init__(self, output_dir: Path, classes: ClassNames, min_score: float) -> None:
        self.path = output_dir / "predictions.json"
        self.drawn = output_dir / "drawn"
        self.classes = classes
        self.min_score = float(min_score)
        self.images: list[dict[str, Any]] = []
        self.annotations: list[dict[str, Any]] = []

    def add(self, file: Path, name: Path, picture: Image.Image, result: Mapping[str, Any]) -> None:
        image_id = len(self.images) + 1
        self.images.append(
            {
                "id": image_id,
                "file_name": str(file),
                "width": picture.width,
                "height": picture.height,
            }
        )
        self.annotations += coco_annotations(image_id, result, len(self.annotations) + 1)
        drawing = draw_detections(
            TF.pil_to_tensor(picture), result, self.classes.names, self.min_score
        )
        path = self.drawn / name.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(drawing.permute(1, 2, 0).numpy()).save(path)

    def close(self) -> list[Path]:
        categories = [
            {"id": i, "name": n}
            for i, n in zip(self.classes.category_ids, self.classes.names, strict=True)
        ]
        content = {"images": self.images, "categories": categories, "annotations": self.annotations}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(content))
        return [self.path, self.drawn]


def coco_annotations(
    image_id: int, result: Mapping[str, Any], first_id: int = 1
) -> list[dict[str, Any]]:
    """One picture's detections as COCO results (xywh boxes, the data set's category ids)."""
    boxes = result["boxes"].double()
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    annotations = [
        {
            "id": first_id + i,
            "image_id": image_id,
            "category_id": int(category),
            "bbox": box,
            "area": box[2] * box[3],
            "score": float(score),
            "iscrowd": 0,
        }
        for i, (category, box, score) in enumerate(
            zip(result["category_ids"].tolist(), xywh, result["scores"].tolist(), strict=True)
        )
    ]
    masks = result.get("masks")
    if masks is not None and annotations:
        array = np.asfortranarray(masks.numpy().astype(np.uint8).transpose(1, 2, 0))
        for annotation, rle in zip(annotations, mask_util.encode(array), strict=True):
            rle["counts"] = rle["counts"].decode("ascii")
            annotation["segmentation"] = rle
            annotation["area"] = float(mask_util.area(rle))
    return annotations


class SegmentationWriter:
    """Per picture: a palette label map at its size under `label_maps/`, an overlay under
    `overlays/`."""

    def __init__(self, output_dir: Path, classes: ClassNames) -> None:
        self.label_maps = output_dir / "label_maps"
        self.overlays = output_dir / "overlays"
        self.num_classes = len(classes)
        colors = class_colors(256)
        self.palette = [value for color in colors for value in color]

    def add(self, file: Path, name: Path, picture: Image.Image, result: Mapping[str, Any]) -> None:
        label_map = result["label_map"]
        path = self.label_maps / name.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        if self.num_classes <= 256:
            image = Image.fromarray(label_map.numpy().astype(np.uint8), mode="P")
            image.putpalette(self.palette)
        else:  # beyond a palette's 256 entries: the indices as 16-bit grey
            image = Image.fromarray(label_map.numpy().astype(np.uint16))
        image.save(path)
        overlay = overlay_label_map(TF.pil_to_tensor(picture), label_map, self.num_classes)
        path = self.overlays / name.with_suffix(".png")
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(overlay.permute(1, 2, 0).numpy()).save(path)

    def close(self) -> list[Path]:
        return [self.label_maps, self.overlays]


def prediction_writer(
    kind: str, output_dir: Path, classes: ClassNames, top_k: int = 5, min_score: float = 0.3
) -> PredictionWriter:
    """The writer of a kind of prediction (module docstring)."""
    if kind == "classification":
        return ClassificationWriter(output_dir, top_k)
    if kind == "detection":
        return DetectionWriter(output_dir, classes, min_score)
    if kind == "segmentation":
        return SegmentationWriter(output_dir, classes)
    raise ValueError(f"no prediction files for task kind {kind!r}")


def batches(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`items` in consecutive chunks of `size`."""
    size = max(1, int(size))
    return [items[i : i + size] for i in range(0, len(items), size)]
