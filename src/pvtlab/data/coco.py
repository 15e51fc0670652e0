"""COCO-format instance data: any instances json and its image folder, read with pycocotools.

Layout expected under `root` (every path overridable, relative to `root` or absolute)::

    root/train2017/*.jpg   root/val2017/*.jpg
    root/annotations/instances_train2017.json   root/annotations/instances_val2017.json

What the loader does with real-world data:

- category ids (any integers) map to contiguous labels 0..K-1 in id order, and back
  (`CategoryMapping`); the training json's categories are the data set's classes (its
  `class_names` and `category_ids`), and every other split must list the same ones;
- crowd annotations (`iscrowd=1`) are left out of the training targets; evaluation reads the json
  itself, so COCOeval honours them as "ignore" regions;
- boxes are clipped to the image; a box narrower or lower than `min_box_size` pixels after
  clipping (zero or negative size, or wholly outside) is dropped; both counted in the log;
- images without a usable instance are skipped in training when `skip_empty` (mmdetection's
  `filter_empty_gt`) and always kept in evaluation;
- masks (`with_masks`) decode from polygons, uncompressed and compressed RLE; an instance without
  a segmentation gets its box as mask (counted);
- grayscale, palette, RGBA and CMYK images become RGB; EXIF orientation is applied when the
  rotated image matches the json's width x height (the annotator's frame), else the stored
  orientation is kept if it matches; any other size is an error naming the file;
- a missing or undecodable image is an error naming the file and image id, or with
  `bad_images="skip"`: missing files are dropped (and counted) when the split is read, undecodable
  ones are replaced by the next image in training and left out of evaluation (each one logged).

A sample is `(image, target)`: the image a (3, H, W) float tensor, resized and normalized by the
transforms; the target holds `boxes` (N, 4) xyxy float32 in that image's pixels, `labels` (N,)
int64, `masks` (N, H, W) uint8 with `with_masks`, `image_id`, `orig_size` and `size` ((h, w) of
the original and of the transformed image). `collate_detection` keeps lists: images differ in size.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from pvtlab.config import ConfigError
from pvtlab.data.classes import check_num_classes
from pvtlab.data.config import as_config
from pvtlab.data.detection_transforms import DetectionTransformConfig
from pvtlab.data.loading import LoaderConfig, processes_on_this_node

log = logging.getLogger(__name__)

BAD_IMAGE_POLICIES = ("error", "skip")
EXIF_ORIENTATION = 0x0112
LAYOUT = (
    "expected COCO layout under data.root: train2017/, val2017/, "
    "annotations/instances_{train,val}2017.json (each overridable: data.splits.train_images, "
    "data.splits.train_annotations, data.splits.val_images, data.splits.val_annotations)"
)


class CocoFormatError(ValueError):
    """An annotation file or image that does not follow the COCO format."""


@dataclass(frozen=True)
class CategoryMapping:
    """Contiguous 0-based labels <-> the data set's category ids (sorted by id)."""

    category_ids: tuple[int, ...]
    names: tuple[str, ...]

    @classmethod
    def from_coco(cls, coco: COCO) -> CategoryMapping:
        cats = sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])
        return cls(
            tuple(int(c["id"]) for c in cats), tuple(str(c.get("name", c["id"])) for c in cats)
        )

    def __len__(self) -> int:
        return len(self.category_ids)

    def to_labels(self, category_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Labels of `category_ids`; an id that is not a category is a KeyError."""
        ids = np.asarray(category_ids, dtype=np.int64)
        table = np.asarray(self.category_ids, dtype=np.int64)
        labels = np.searchsorted(table, ids)
        bad = (labels >= len(table)) | (table[np.minimum(labels, len(table) - 1)] != ids)
        if bad.any():
            raise KeyError(
                f"category id(s) {sorted(set(ids[bad].tolist()))} are not among the categories "
                f"{list(self.category_ids)}"
            )
        return labels

    def to_category_ids(self, labels: Sequence[int] | np.ndarray | Tensor) -> np.ndarray:
        labels = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels, dtype=np.int64)
        if labels.size and (labels.min() < 0 or labels.max() >= len(self)):
            raise IndexError(f"labels must lie in [0, {len(self) - 1}], got {labels.tolist()}")
        return np.asarray(self.category_ids, dtype=np.int64)[labels]


def load_coco(path: str | Path) -> COCO:
    """A pycocotools COCO index of `path`, checked, with COCOeval's fields filled in.

    Annotations without `iscrowd` get 0 and without `area` get their box area (COCOeval needs
    both); images must have id, file_name, width and height.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file; {LAYOUT}")
    try:
        dataset = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CocoFormatError(f"{path} is not readable JSON: {error}") from error
    if not isinstance(dataset, dict) or "images" not in dataset or "categories" not in dataset:
        raise CocoFormatError(
            f"{path} is not a COCO instances file: it needs 'images', 'annotations' and 'categories'"
        )
    dataset.setdefault("annotations", [])
    for image in dataset["images"]:
        missing = [k for k in ("id", "file_name", "width", "height") if k not in image]
        if missing:
            raise CocoFormatError(f"{path}: image record {image} lacks {missing}")
    for index, ann in enumerate(dataset["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "bbox") if k not in ann]
        if missing:
            raise CocoFormatError(
                f"{path}: annotation record #{index} {_short(ann)} lacks {missing}; COCO "
                "annotations need id, image_id, category_id and bbox [x, y, width, height]"
            )
    for field, records in (
        ("images", dataset["images"]),
        ("annotations", dataset["annotations"]),
        ("categories", dataset["categories"]),
    ):
        ids, counts = np.unique(np.array([r["id"] for r in records]), return_counts=True)
        if (counts > 1).any():
            repeated = ids[counts > 1].tolist()
            raise CocoFormatError(
                f"{path}: {field} id(s) {repeated[:10]} occur more than once; every record of "
                f"'{field}' needs its own id"
            )
    filled = 0
    for ann in dataset["annotations"]:
        if "iscrowd" not in ann or "area" not in ann:
            filled += 1
            ann.setdefault("iscrowd", 0)
            bbox = ann.get("bbox") or [0, 0, 0, 0]
            ann.setdefault("area", float(bbox[2]) * float(bbox[3]) if len(bbox) == 4 else 0.0)
    if filled:
        log.info(
            "%s: %d annotations without iscrowd/area got 0 / their box area", path.name, filled
        )
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def segmentation_to_mask(segmentation: Any, height: int, width: int) -> np.ndarray | None:
    """(H, W) uint8 of COCO polygons or RLE (uncompressed or compressed); None when there is no
    usable shape (no polygon of at least three points)."""
    if isinstance(segmentation, list):
        # pycocotools reads a 4-number "polygon" as a box: keep real polygons only.
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return None
        rle = mask_util.merge(mask_util.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        if isinstance(segmentation["counts"], list):
            rle = mask_util.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {
                "size": segmentation["size"],
                "counts": counts.encode() if isinstance(counts, str) else counts,
            }
    else:
        return None
    with warnings.catch_warnings():
        # pycocotools' decoder predates numpy 2's __array__(copy=) protocol; the result is right.
        warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
        return mask_util.decode(rle)


def _box_mask(box: np.ndarray, height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    x0, y0 = np.floor(box[:2]).astype(int)
    x1, y1 = np.ceil(box[2:]).astype(int)
    mask[y0:y1, x0:x1] = 1
    return mask


class CocoDetection(Dataset):
    """One split of a COCO-format data set (see the module docstring for the cases handled).

    Args:
        image_dir: folder the json's `file_name`s are relative to.
        annotation_file: the instances json.
        transforms: called on `(tv_tensors.Image, target)`; None keeps the uint8 image.
        train: training split (crowd-free targets, `skip_empty`, undecodable images replaced).
        with_masks: decode instance masks into the targets.
        skip_empty: leave images without a usable instance out of a training split.
        bad_images: "error" or "skip" for missing or undecodable image files.
        min_box_size: boxes narrower or lower than this (pixels, after clipping) are dropped.
        check_files: look for every image file when the split is read (one stat per image).
        coco: the annotation file already read (`load_coco`); None reads it.
    """

    def __init__(
        self,
        image_dir: str | Path,
        annotation_file: str | Path,
        transforms: Any = None,
        train: bool = False,
        with_masks: bool = False,
        skip_empty: bool = True,
        bad_images: str = "error",
        min_box_size: float = 1.0,
        check_files: bool = True,
        coco: COCO | None = None,
    ) -> None:
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"bad_images={bad_images!r}; choose one of {BAD_IMAGE_POLICIES}")
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        self.transforms = transforms
        self.train = train
        self.with_masks = with_masks
        self.bad_images = bad_images
        self.min_box_size = float(min_box_size)
        self.coco = coco if coco is not None else load_coco(self.annotation_file)
        self.categories = CategoryMapping.from_coco(self.coco)
        self.stats: dict[str, int] = {}
        self._instances = self._read_instances()
        image_ids = sorted(self.coco.imgs)
        if train and skip_empty:
            image_ids = [i for i in image_ids if i in self._instances]
            self.stats["empty_images_skipped"] = len(self.coco.imgs) - len(image_ids)
        if check_files:
            image_ids = self._existing(image_ids)
        self.image_ids = image_ids
        self._log_stats()

    # ---------------------------------------------------------------- reading the annotations

    def _read_instances(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per image: kept boxes (n, 4) xyxy float32, labels (n,), annotation ids (n,)."""
        anns = self.coco.dataset["annotations"]
        name = self.annotation_file.name
        if not anns:
            return {}
        ann_ids = np.array([a.get("id", -1) for a in anns], dtype=np.int64)
        try:
            boxes = np.array([a["bbox"] for a in anns], dtype=np.float64).reshape(len(anns), 4)
        except (KeyError, TypeError, ValueError):
            bad = next(a for a in anns if not _is_box(a.get("bbox")))
            raise CocoFormatError(
                f"{name}: annotation {bad.get('id')} (image {bad.get('image_id')}) has bbox "
                f"{bad.get('bbox')!r}; expected [x, y, width, height]"
            ) from None
        finite = np.isfinite(boxes).all(axis=1)
        if not finite.all():
            bad = anns[int(np.flatnonzero(~finite)[0])]
            raise CocoFormatError(
                f"{name}: annotation {bad.get('id')} (image {bad.get('image_id')}) has bbox "
                f"{bad.get('bbox')!r} with a NaN or infinite value ({int((~finite).sum())} such "
                "boxes); fix or remove them"
            )
        image_of = np.array([a["image_id"] for a in anns], dtype=np.int64)
        known_images = np.array(sorted(self.coco.imgs), dtype=np.int64)
        where = np.searchsorted(known_images, image_of).clip(0, max(len(known_images) - 1, 0))
        unknown = (
            known_images[where] != image_of if len(known_images) else np.ones_like(image_of, bool)
        )
        if unknown.any():
            k = int(np.flatnonzero(unknown)[0])
            raise CocoFormatError(
                f"{name}: annotation {ann_ids[k]} refers to image {image_of[k]}, which is not in 'images'"
            )
        try:
            labels = self.categories.to_labels([a["category_id"] for a in anns])
        except KeyError as error:
            bad = next(a for a in anns if a["category_id"] not in self.categories.category_ids)
            raise CocoFormatError(
                f"{name}: annotation {bad.get('id')} (image {bad['image_id']}) has category_id "
                f"{bad['category_id']}; {error.args[0]}"
            ) from None
        crowd = np.array([bool(a.get("iscrowd", 0)) for a in anns])

        sizes = np.array(
            [(self.coco.imgs[i]["width"], self.coco.imgs[i]["height"]) for i in known_images],
            dtype=np.float64,
        )
        limit = np.tile(sizes[where], 2)  # (w, h, w, h) per annotation
        xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], axis=1)
        clipped = np.clip(xyxy, 0, limit)
        size_ok = ((clipped[:, 2:] - clipped[:, :2]) >= self.min_box_size).all(axis=1)
        changed = (np.abs(clipped - xyxy) > 1e-3).any(axis=1)
        keep = size_ok & ~crowd
        self.stats.update(
            instances=int(keep.sum()),
            crowd_left_out=int(crowd.sum()),
            boxes_clipped=int((changed & keep).sum()),
            boxes_dropped=int((~size_ok & ~crowd).sum()),
        )
        if self.with_masks:
            no_shape = np.array([not _has_shape(a.get("segmentation")) for a in anns]) & keep
            self.stats["masks_from_boxes"] = int(no_shape.sum())
            if no_shape.any():
                where = np.flatnonzero(no_shape)
                named = [
                    f"annotation {ann_ids[k]} ({self.coco.imgs[int(image_of[k])]['file_name']})"
                    for k in where[:5]
                ]
                log.warning(
                    "%s: %d instance(s) without a usable mask take their box as mask: %s%s",
                    name,
                    len(where),
                    ", ".join(named),
                    f" and {len(where) - 5} more" if len(where) > 5 else "",
                )

        order = np.flatnonzero(keep)
        order = order[np.argsort(image_of[order], kind="stable")]
        groups, starts = np.unique(image_of[order], return_index=True)
        out = {}
        for image_id, part in zip(groups.tolist(), np.split(order, starts[1:]), strict=True):
            out[image_id] = (clipped[part].astype(np.float32), labels[part], ann_ids[part])
        return out

    def _existing(self, image_ids: list[int]) -> list[int]:
        missing = [
            i for i in image_ids if not (self.image_dir / self.coco.imgs[i]["file_name"]).is_file()
        ]
        if not missing:
            return image_ids
        names = [str(self.image_dir / self.coco.imgs[i]["file_name"]) for i in missing[:5]]
        if self.bad_images == "error":
            raise FileNotFoundError(
                f"{len(missing)} image file(s) of {self.annotation_file} are missing, e.g. "
                f"{', '.join(names)} (image id {missing[0]}). Point data.splits.*_images at the folder "
                f"holding them, or set data.bad_images=skip to leave them out; {LAYOUT}"
            )
        self.stats["missing_images_skipped"] = len(missing)
        log.warning(
            "%s: %d missing image files skipped, e.g. %s",
            self.annotation_file.name,
            len(missing),
            names[0],
        )
        skip = set(missing)
        return [i for i in image_ids if i not in skip]

    def _log_stats(self) -> None:
        details = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in self.stats.items() if v)
        log.info(
            "%s: %d images, %d categories%s",
            self.annotation_file.name,
            len(self.image_ids),
            len(self.categories),
            f" ({details})" if details else "",
        )

    # ---------------------------------------------------------------- reading one sample

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        for attempt in range(len(self.image_ids)):
            sample = self.load(self.image_ids[(index + attempt) % len(self.image_ids)])
            # Training replaces an undecodable image by the next one (every DDP rank still takes
            # a step); evaluation leaves it out (the collate drops None).
            if sample is not None or not self.train:
                return sample
        raise CocoFormatError(f"no image of {self.annotation_file} could be decoded")

    def load(self, image_id: int) -> tuple[Tensor, dict[str, Tensor]] | None:
        """The transformed sample of `image_id`; None if its file is bad and bad_images=skip."""
        info = self.coco.imgs[image_id]
        image = self.read_image(image_id)
        if image is None:
            return None
        height, width = int(info["height"]), int(info["width"])
        empty = (np.zeros((0, 4), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64))
        boxes, labels, ann_ids = self._instances.get(image_id, empty)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(
                torch.from_numpy(boxes), format="XYXY", canvas_size=(height, width)
            ),
            "labels": torch.from_numpy(labels.astype(np.int64)),
        }
        if self.with_masks:
            target["masks"] = tv_tensors.Mask(self._masks(boxes, ann_ids, height, width))
        pixels = tv_tensors.Image(TF.pil_to_tensor(image))
        if self.transforms is not None:
            pixels, target = self.transforms(pixels, target)
        out = {
            "boxes": target["boxes"].as_subclass(Tensor).float(),
            "labels": target["labels"],
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
            "size": torch.tensor(pixels.shape[-2:], dtype=torch.int64),
        }
        if self.with_masks:
            out["masks"] = target["masks"].as_subclass(Tensor).to(torch.uint8)
        return pixels.as_subclass(Tensor), out

    def _masks(self, boxes: np.ndarray, ann_ids: np.ndarray, height: int, width: int) -> Tensor:
        if not len(ann_ids):
            return torch.zeros(0, height, width, dtype=torch.uint8)
        masks = []
        for box, ann_id in zip(boxes, ann_ids.tolist(), strict=True):
            mask = segmentation_to_mask(self.coco.anns[ann_id].get("segmentation"), height, width)
            masks.append(_box_mask(box, height, width) if mask is None else mask)
        return torch.from_numpy(np.stack(masks))

    def read_image(self, image_id: int) -> Image.Image | None:
        """The RGB image of `image_id` in the json's frame (see the module docstring)."""
        info = self.coco.imgs[image_id]
        path = self.image_dir / info["file_name"]
        try:
            with Image.open(path) as raw:
                raw.load()
                image = self._orient(raw, path, image_id, (int(info["width"]), int(info["height"])))
                return image.convert("RGB")
        except (
            OSError,
            UnidentifiedImageError,
            SyntaxError,
            ValueError,
            Image.DecompressionBombError,
        ) as error:
            message = (
                f"{path} (image id {image_id} of {self.annotation_file}) cannot be used: {error}"
            )
            if self.bad_images == "error":
                raise CocoFormatError(
                    f"{message}. Set data.bad_images=skip to skip such files."
                ) from error
            log.warning("skipped: %s", message)
            return None

    def _orient(
        self, image: Image.Image, path: Path, image_id: int, size: tuple[int, int]
    ) -> Image.Image:
        if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
            rotated = ImageOps.exif_transpose(image)
            if rotated.size == size:
                return rotated
        if image.size == size:
            return image
        raise CocoFormatError(
            f"{path} is {image.size[0]}x{image.size[1]} pixels (also after EXIF rotation) but "
            f"{self.annotation_file.name} says {size[0]}x{size[1]} for image id {image_id}"
        )


def _describe(categories: CategoryMapping, limit: int = 5) -> str:
    pairs = [f"{i}={n!r}" for i, n in zip(categories.category_ids, categories.names, strict=True)]
    return ", ".join(pairs[:limit]) + (" ..." if len(pairs) > limit else "")


def _short(record: dict[str, Any]) -> str:
    """A record for an error message, without its (possibly huge) segmentation."""
    return str({k: v for k, v in record.items() if k != "segmentation"})[:200]


def _is_box(value: Any) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == 4
        and all(isinstance(v, int | float) for v in value)
    )


def _has_shape(segmentation: Any) -> bool:
    if isinstance(segmentation, list):
        return any(len(p) >= 6 for p in segmentation)
    return isinstance(segmentation, dict) and "counts" in segmentation


def collate_detection(
    batch: Sequence[tuple[Tensor, dict[str, Tensor]] | None],
) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Lists of images and targets (sizes differ); skipped samples (None) are left out."""
    samples = [s for s in batch if s is not None]
    return [s[0] for s in samples], [s[1] for s in samples]


@dataclass(frozen=True)
class CocoSplits:
    """The `splits:` group of a COCO-format data config: each split's image folder and instances
    json, relative to the data set's root unless absolute. The test split defaults to val."""

    train_images: str = "train2017"
    train_annotations: str = "annotations/instances_train2017.json"
    val_images: str = "val2017"
    val_annotations: str = "annotations/instances_val2017.json"
    test_images: str | None = None
    test_annotations: str | None = None

    def paths(self, root: Path) -> dict[str, tuple[Path, Path]]:
        """(image folder, annotation file) of train, val and test under `root`."""
        return {
            "train": (root / self.train_images, root / self.train_annotations),
            "val": (root / self.val_images, root / self.val_annotations),
            "test": (
                root / (self.test_images or self.val_images),
                root / (self.test_annotations or self.val_annotations),
            ),
        }


class CocoDataModule(L.LightningDataModule):
    """COCO-format train / val / test splits for detection and instance segmentation.

    Args:
        root: data set folder; the split paths are relative to it unless absolute.
        splits: image folders and jsons of the splits (`CocoSplits`, or a mapping of its fields).
        loader: batch sizes and loader settings (`pvtlab.data.loading.LoaderConfig`, or a mapping
            of its fields); the paper: 2 training images per GPU x 8 GPUs.
        transforms: training and evaluation scales, flip, normalization
            (`pvtlab.data.detection_transforms.DetectionTransformConfig`, or a mapping).
        with_masks: decode instance masks (Mask R-CNN; its recipe overlays set it).
        skip_empty, bad_images, min_box_size, check_files: see `CocoDetection`.
        kind: the task kind these data serve (must be detection).
        num_classes: expected number of categories, checked against the json; None: the
            json's.

    The classes are the categories of the training json (of the val json when there is no
    training json: an evaluation-only set): `class_names` and `category_ids` in label order.
    """

    def __init__(
        self,
        root: str | Path,
        splits: CocoSplits | Mapping[str, Any] | None = None,
        loader: LoaderConfig | Mapping[str, Any] | None = None,
        transforms: DetectionTransformConfig | Mapping[str, Any] | None = None,
        with_masks: bool = False,
        skip_empty: bool = True,
        bad_images: Literal["error", "skip"] = "error",
        min_box_size: float = 1.0,
        check_files: bool = True,
        kind: str = "detection",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if kind != "detection":
            raise ValueError(f"CocoDataModule serves task=detection, not kind={kind!r}")
        if bad_images not in BAD_IMAGE_POLICIES:
            raise ValueError(f"data.bad_images={bad_images!r}; choose one of {BAD_IMAGE_POLICIES}")
        self.root = Path(root)
        self.splits = as_config(splits, CocoSplits(), "data.splits")
        self.paths = self.splits.paths(self.root)
        self.loader = as_config(loader, LoaderConfig(), "data.loader")
        self.batch_size = self.loader.batch_size
        self.eval_batch_size = self.loader.eval_batch_size or self.loader.batch_size
        self.loading = self.loader.settings()
        self.expected_num_classes = num_classes
        self._annotations: dict[Path, COCO] = {}
        self._categories: CategoryMapping | None = None
        self.dataset_options = {
            "with_masks": with_masks,
            "skip_empty": skip_empty,
            "bad_images": bad_images,
            "min_box_size": min_box_size,
            "check_files": check_files,
        }
        self.transforms = as_config(transforms, DetectionTransformConfig(), "data.transforms")
        self.train_transform = self.transforms.train()
        self.eval_transform = self.transforms.eval()
        self.datasets: dict[str, CocoDetection] = {}

    def _read(self, annotation_file: Path) -> COCO:
        """An annotation file, read once (the classes and the split share it)."""
        if annotation_file not in self._annotations:
            self._annotations[annotation_file] = load_coco(annotation_file)
        return self._annotations[annotation_file]

    @property
    def class_source(self) -> Path:
        """The json whose categories are the classes: the training json, else the val json."""
        train = self.paths["train"][1]
        return train if train.is_file() else self.paths["val"][1]

    @property
    def categories(self) -> CategoryMapping:
        """The classes (read from `class_source` on first use, checked against num_classes)."""
        if self._categories is None:
            categories = CategoryMapping.from_coco(self._read(self.class_source))
            check_num_classes(
                self.expected_num_classes, len(categories), self.class_source, "categories"
            )
            self._categories = categories
        return self._categories

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.categories.names

    @property
    def category_ids(self) -> list[int]:
        return list(self.categories.category_ids)

    def use_model_classes(self, class_names: Sequence[str] | None, num_classes: int) -> None:
        """A trained detector is scored on data of its own categories (the same names, in the
        same label order); anything else is a ConfigError naming the difference."""
        names = list(class_names) if class_names else None
        if names == list(self.class_names) or (names is None and num_classes == self.num_classes):
            return
        known = set(names or ())
        unknown = [n for n in self.class_names if n not in known]
        raise ConfigError(
            f"{self.class_source} has {self.num_classes} categories and the model "
            f"{num_classes} classes"
            + (f"; categories the model does not know: {unknown[:10]}" if unknown else "")
            + (
                f"; the model's classes in label order: {names[:10]}{' ...' if len(names) > 10 else ''}"
                if names
                else "; the model records no class names"
            )
            + ". A detector is scored on data with its own categories, in the same order."
        )

    def split(self, name: str) -> CocoDetection:
        """The dataset of split `name` (train | val | test), read on first use."""
        if name == "test" and self.paths["test"] == self.paths["val"]:
            name = "val"  # the test split defaults to the val split: read it once
        if name not in self.datasets:
            image_dir, annotations = self.paths[name]
            if not image_dir.is_dir():
                raise FileNotFoundError(
                    f"{image_dir}: no such image folder ({name} split); {LAYOUT}"
                )
            train = name == "train"
            classes = self.categories
            coco = self._read(annotations)
            if CategoryMapping.from_coco(coco) != classes:
                other = CategoryMapping.from_coco(coco)
                raise CocoFormatError(
                    f"the categories of {annotations} ({len(other)}: "
                    f"{_describe(other)}) differ from those of {self.class_source} "
                    f"({len(classes)}: {_describe(classes)}); every split needs the same "
                    "category ids and names"
                )
            dataset = CocoDetection(
                image_dir,
                annotations,
                self.train_transform if train else self.eval_transform,
                train=train,
                coco=coco,
                **self.dataset_options,
            )
            self.datasets[name] = dataset
        return self.datasets[name]

    def setup(self, stage: str | None = None) -> None:
        needed = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}
        for name in needed.get(stage or "fit", ("val",)):
            self.split(name)

    def _loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(
            self.split(name),
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate_detection,
            **self.loading.for_processes(processes_on_this_node(self.trainer)).kwargs(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self.val_dataloader()
