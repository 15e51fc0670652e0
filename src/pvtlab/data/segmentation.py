"""ADE20K-layout semantic segmentation data: image and label-map folders.

Layout under `root` (ADE20K's `ADEChallengeData2016`, and the embedded shapes set)::

    images/training/<id>.jpg        annotations/training/<id>.png
    images/validation/<id>.jpg      annotations/validation/<id>.png

    classes.txt                     optional: the class names, one a line, in label order
    manifest.json                   optional: {"classes": [names]} (the shapes generator's)

Label maps are single-channel PNGs of the image's size. An image is read as its EXIF orientation
shows it (`pvtlab.data.images`, as the predictor reads it); its label map, which carries no
orientation, is turned the same way when it has the stored image's size (drawn on the stored
pixels) and kept when it has the turned size (drawn on the picture as viewers show it). With `reduce_zero_label` (ADE20K), value 0
("other") becomes the ignore index 255 and classes 1..K become 0..K-1; a stored 255 stays ignored.

The classes are what the folder lists (`classes.txt`, else `manifest.json`; ADE20K's release
ships `objectInfo150.txt`, which stands for its 150 classes); `data.num_classes`, when set, is
checked against that list, and is needed only for a folder that lists none.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from pvtlab.config import ConfigError
from pvtlab.data.classes import CLASS_LIST_FILES, check_num_classes, label_mapping, read_class_list
from pvtlab.data.config import as_config
from pvtlab.data.images import DECODE_ERRORS, orientation_transpose, to_rgb
from pvtlab.data.loading import LoaderConfig, processes_on_this_node
from pvtlab.data.segmentation_transforms import SegmentationTransformConfig, padded_size

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain",
    "chair", "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing",
    "cushion", "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink",
    "skyscraper", "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case",
    "pool table", "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind",
    "coffee table", "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm",
    "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus",
    "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth",
    "television receiver", "airplane", "dirt track", "apparel", "pole", "land", "bannister",
    "escalator", "ottoman", "bottle", "buffet", "poster", "stage", "van", "ship", "fountain",
    "conveyer belt", "canopy", "washer", "plaything", "swimming pool", "stool", "barrel", "basket",
    "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball", "food", "step", "tank",
    "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher", "screen",
    "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass",
    "clock", "flag",
)  # fmt: skip

# The class table that ADE20K's release (ADEChallengeData2016) ships beside its folders.
ADE20K_CLASS_TABLE = "objectInfo150.txt"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
LAYOUT = "images/{split}/<id>.jpg with annotations/{split}/<id>.png"


class LabelMapError(ValueError):
    """An image / label-map pair that cannot be used; the message names the file."""


class SegmentationFolder(Dataset):
    """Image and label-map pairs of one split, transformed jointly.

    Args:
        root: data set folder holding `images/<split>` and `annotations/<split>`.
        split: `training`, `validation` (or any folder name present in both).
        num_classes: classes after the zero-label shift (150 for ADE20K).
        transform: `(image uint8 (3,H,W), label uint8 (H,W)) -> (image float, label int64)`.
        reduce_zero_label: map 0 to `ignore_index` and shift the other classes down by one.
        labels: the label each class becomes (a trained model's label of it); None: itself.
    """

    def __init__(
        self,
        root: str | Path,
        split: str,
        num_classes: int,
        transform: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]] | None = None,
        reduce_zero_label: bool = True,
        ignore_index: int = 255,
        labels: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.num_classes = int(num_classes)
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        self.samples = self._pairs()
        # Stored label values -> training labels, one lookup table for every map. Labels stay
        # uint8 (a byte a pixel) until the transform's end, which makes them int64.
        if not 0 <= ignore_index <= 255 or self.num_classes > 255:
            raise ValueError(
                f"label maps hold 8-bit class indices: num_classes={self.num_classes} must be at "
                f"most 255 and ignore_index={ignore_index} within 0..255"
            )
        lookup = np.full(256, ignore_index, dtype=np.uint8)
        offset = 1 if reduce_zero_label else 0
        lookup[offset : offset + self.num_classes] = (
            np.arange(self.num_classes) if labels is None else np.asarray(labels)
        )
        self.lookup = lookup
        self.max_stored = self.num_classes if reduce_zero_label else self.num_classes - 1

    def _pairs(self) -> list[tuple[Path, Path]]:
        image_dir = self.root / "images" / self.split
        label_dir = self.root / "annotations" / self.split
        for folder in (image_dir, label_dir):
            if not folder.is_dir():
                raise FileNotFoundError(
                    f"{folder} does not exist; a segmentation data set needs {LAYOUT.format(split=self.split)} "
                    f"under {self.root}"
                )
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"{image_dir} holds no images (.jpg, .jpeg, .png)")
        pairs = []
        for image in images:
            label = label_dir / f"{image.stem}.png"
            if not label.is_file():
                raise LabelMapError(f"{image} has no label map: expected {label}")
            pairs.append((image, label))
        return pairs

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> tuple[Tensor, Tensor]:
        """The stored image (uint8, 3xHxW) and training label map (uint8, HxW), checked."""
        image_path, label_path = self.samples[index]
        try:
            with Image.open(image_path) as handle:
                handle.load()
                turn = orientation_transpose(handle)
                stored_size = handle.size
                image = torch.from_numpy(np.array(to_rgb(handle))).permute(2, 0, 1)
        except DECODE_ERRORS as error:
            raise LabelMapError(f"{image_path} cannot be decoded as an image: {error}") from error
        with Image.open(label_path) as handle:
            if handle.mode not in ("L", "P", "I", "I;16"):
                raise LabelMapError(
                    f"{label_path} is a {handle.mode} image; a label map is a single-channel PNG of class indices"
                )
            handle.load()
            # The image is shown as its EXIF orientation says (as the predictor shows it); a label
            # map drawn on the stored pixels (its size is theirs) turns with it, one drawn on the
            # turned picture is kept.
            if turn is not None and handle.size == stored_size:
                handle = handle.transpose(turn)
            stored = np.asarray(handle)
            values = _values_present(handle, stored)
        if tuple(stored.shape) != tuple(image.shape[-2:]):
            raise LabelMapError(
                f"{label_path} is {stored.shape[1]}x{stored.shape[0]} (WxH) but its image {image_path.name} is "
                f"{image.shape[2]}x{image.shape[1]}; a label map must match its image's size"
            )
        bad = [v for v in values if v < 0 or (v > self.max_stored and v != self.ignore_index)]
        if bad:
            valid = f"0..{self.max_stored}" + (
                " (0 = unlabelled)" if self.reduce_zero_label else ""
            )
            raise LabelMapError(
                f"{label_path} holds label values {bad[:10]} beyond the {self.num_classes} classes; "
                f"valid values are {valid} or {self.ignore_index} (ignored)"
            )
        return image, torch.from_numpy(self.lookup[stored])

    def __getitem__(self, index: int) -> dict[str, Any]:
        image, label = self.load(index)
        height, width = label.shape
        if self.transform is not None:
            image, label = self.transform(image, label)
        return {
            "image": image,
            "label": label,
            "name": self.samples[index][0].stem,
            "original_size": (height, width),
        }


def _values_present(handle: Image.Image, stored: np.ndarray) -> list[int]:
    """The distinct values of a label map, ascending: from Pillow's histogram for 8-bit maps
    (one pass in C), else from the array."""
    if handle.mode in ("L", "P"):
        return [value for value, count in enumerate(handle.histogram()) if count]
    return np.unique(stored).tolist()


def folder_classes(root: Path) -> tuple[tuple[str, ...], Path] | None:
    """The class names a segmentation folder lists and the file that lists them (None: none).

    `classes.txt`, else `manifest.json`'s `classes`, else ADE20K's own `objectInfo150.txt`
    (ADE20K's 150 names)."""
    listed = read_class_list(root)
    if listed is not None:
        return listed
    if (root / ADE20K_CLASS_TABLE).is_file():
        return ADE20K_CLASSES, root / ADE20K_CLASS_TABLE
    return None


def resolve_classes(
    root: Path, num_classes: int | None, class_names: Sequence[str] | None = None
) -> tuple[str, ...]:
    """The class names of a segmentation folder: `class_names` if given, else what the folder
    lists (`folder_classes`), else `class_<i>` for a set `num_classes`. A set `num_classes` must
    agree with the list; with neither, the error says how to describe the classes."""
    if class_names is not None:
        names, source = tuple(str(n) for n in class_names), "data.class_names"
    else:
        listed = folder_classes(root)
        if listed is None:
            if num_classes is None:
                raise ConfigError(
                    f"{root} does not say its classes: add {root / CLASS_LIST_FILES[0]} (one "
                    "class name a line, in label order: label value 1 first with "
                    "data.reduce_zero_label=true, else value 0) or set data.num_classes"
                )
            return tuple(f"class_{i}" for i in range(int(num_classes)))
        names, source = listed
    check_num_classes(num_classes, len(names), source)
    return names


def collate_segmentation(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack samples, padding images with 0 and labels with 255 to the largest in the batch.

    `image_size` / `label_size` (B, 2) keep each sample's unpadded sizes, so evaluation can crop
    the padding off before resizing a prediction to its label map.
    """
    image_sizes = [tuple(s["image"].shape[-2:]) for s in samples]
    label_sizes = [tuple(s["label"].shape[-2:]) for s in samples]
    height, width = padded_size(image_sizes)
    label_h, label_w = padded_size(label_sizes)
    images = samples[0]["image"].new_zeros((len(samples), 3, height, width), dtype=torch.float32)
    labels = torch.full((len(samples), label_h, label_w), 255, dtype=torch.long)
    for i, sample in enumerate(samples):
        h, w = image_sizes[i]
        images[i, :, :h, :w] = sample["image"]
        lh, lw = label_sizes[i]
        labels[i, :lh, :lw] = sample["label"]
    return {
        "image": images,
        "label": labels,
        "image_size": torch.tensor(image_sizes, dtype=torch.long),
        "label_size": torch.tensor(label_sizes, dtype=torch.long),
        "name": [s["name"] for s in samples],
    }


@dataclass(frozen=True)
class SegmentationSplits:
    """The `splits:` group of a segmentation data config: the folder name of each split under
    `images/` and `annotations/`. The test split defaults to val."""

    train: str = "training"
    val: str = "validation"
    test: str | None = None


class ADE20KDataModule(L.LightningDataModule):
    """Train / val / test loaders over an ADE20K-layout folder (`data=ade20k data.root=...`).

    Args:
        root: folder with `images/` and `annotations/` (ADE20K: `ADEChallengeData2016`).
        kind: the task kind this data serves; must be `segmentation`.
        num_classes: classes after the zero-label shift, checked against the folder's class list
            (module docstring); None: that list's length.
        class_names: the class names in label order, instead of the folder's list.
        splits: folder names of the splits (`SegmentationSplits`, or a mapping of its fields).
        loader: batch sizes and loader settings (`pvtlab.data.loading.LoaderConfig`, or a mapping
            of its fields). Images of one evaluation batch are padded to the largest, so an
            `eval_batch_size` of 1 wastes no compute.
        transforms: the training pipeline and the evaluation resize
            (`pvtlab.data.segmentation_transforms.SegmentationTransformConfig`, or a mapping).
        reduce_zero_label, ignore_index: see `SegmentationFolder`.
    """

    def __init__(
        self,
        root: str | Path,
        kind: str = "segmentation",
        num_classes: int | None = None,
        class_names: Sequence[str] | None = None,
        splits: SegmentationSplits | Mapping[str, Any] | None = None,
        loader: LoaderConfig | Mapping[str, Any] | None = None,
        transforms: SegmentationTransformConfig | Mapping[str, Any] | None = None,
        reduce_zero_label: bool = True,
        ignore_index: int = 255,
    ) -> None:
        super().__init__()
        if kind != "segmentation":
            raise ValueError(f"ADE20KDataModule serves task=segmentation, not {kind}")
        self.root = Path(root)
        if not self.root.is_dir():  # fail before the model is built, not at the first batch
            raise FileNotFoundError(
                f"data.root={self.root} does not exist; an ADE20K-layout data set needs "
                f"{LAYOUT.format(split='training')} and {LAYOUT.format(split='validation')} "
                f"under it (ADEChallengeData2016). Set it with data.root=/path/to/ADEChallengeData2016."
            )
        self.class_names = resolve_classes(self.root, num_classes, class_names)
        self.num_classes = len(self.class_names)
        self.category_ids: list[int] | None = None
        self.labels: list[int] | None = None  # a trained model's label of each class
        self.loader = as_config(loader, LoaderConfig(eval_batch_size=1), "data.loader")
        self.batch_size = self.loader.batch_size
        self.eval_batch_size = self.loader.eval_batch_size or self.loader.batch_size
        self.loading = self.loader.settings()
        self.reduce_zero_label = reduce_zero_label
        self.ignore_index = ignore_index
        folders = as_config(splits, SegmentationSplits(), "data.splits")
        self.splits = {
            "train": folders.train,
            "val": folders.val,
            "test": folders.test or folders.val,
        }
        self.transforms = as_config(transforms, SegmentationTransformConfig(), "data.transforms")
        self.train_transform = self.transforms.train(ignore_index)
        self.test_transform = self.transforms.eval()
        self.datasets: dict[str, SegmentationFolder] = {}

    def use_model_classes(self, class_names: Sequence[str] | None, num_classes: int) -> None:
        """Label the classes with a trained model's labels, matched by name (see
        `pvtlab.data.classes.label_mapping`); before any split is read."""
        labels = label_mapping(self.class_names, class_names, num_classes, self.root)
        self.labels = None if labels == list(range(self.num_classes)) else labels
        self.datasets.clear()

    def dataset(self, stage: str) -> SegmentationFolder:
        """The `train`, `val` or `test` dataset (built on first use)."""
        if stage not in self.datasets:
            transform = self.train_transform if stage == "train" else self.test_transform
            self.datasets[stage] = SegmentationFolder(
                self.root,
                self.splits[stage],
                self.num_classes,
                transform,
                self.reduce_zero_label,
                self.ignore_index,
                self.labels,
            )
        return self.datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("test",),
        }
        for name in needed.get(stage or "fit", ("train", "val", "test")):
            self.dataset(name)

    def _loader(self, stage: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.dataset(stage),
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            collate_fn=collate_segmentation,
            **self.loading.for_processes(processes_on_this_node(self.trainer)).kwargs(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size, shuffle=False)
