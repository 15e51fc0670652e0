"""Image-folder classification data (ImageNet's layout) as a LightningDataModule.

Layout under `root`::

    root/train/<class>/<image>     e.g. train/n01440764/n01440764_10026.JPEG
    root/val/<class>/<image>       the same class folders (ImageNet val sorted into them)
    root/test/<class>/<image>      optional; the test split defaults to val

Classes are the sorted folder names of train/ (`class_names`; label i is the i-th); val/ (and
test/) must hold the same set. Evaluating a trained model, `use_model_classes` labels the folders
by the model's own class names instead, so a folder holding a subset of its classes is scored on
them (`pvtlab.data.classes.label_mapping`). Files
whose extension is not an image's, and images that fail to decode, are an error naming the file,
or with ``invalid_files="skip"`` are left out (counted in the log) when the folders are read and
replaced by the next image when they fail to decode.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from pvtlab.data.classes import check_num_classes, label_mapping
from pvtlab.data.config import as_config
from pvtlab.data.images import DECODE_ERRORS, read_rgb
from pvtlab.data.loading import LoaderConfig, processes_on_this_node
from pvtlab.data.samplers import RepeatAugSampler
from pvtlab.data.transforms import ClassificationTransformConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
INVALID_FILE_POLICIES = ("error", "skip")
SPLITS = ("train", "val", "test")


def layout_help(root: Path) -> str:
    return (
        f"Expected an image-folder data set (ImageNet layout) at {root}:\n"
        f"  {root}/train/<class>/<image>.JPEG   e.g. train/n01440764/n01440764_10026.JPEG\n"
        f"  {root}/val/<class>/<image>.JPEG     the same class folders as train/\n"
        f"  {root}/test/<class>/<image>.JPEG    optional (the test split defaults to val)\n"
        f"Image extensions: {', '.join(IMAGE_EXTENSIONS)}. Set it with data.root=/path/to/imagenet."
    )


class ImageFolderError(ValueError):
    """A data folder that does not follow the image-folder layout."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of one split (hidden folders ignored)."""
    return sorted(
        entry.name
        for entry in os.scandir(split_dir)
        if entry.is_dir() and not entry.name.startswith(".")
    )


def scan_split(
    split_dir: Path, classes: Sequence[str], invalid_files: str = "error"
) -> tuple[list[tuple[str, int]], list[str]]:
    """(path, class index) of every image of a split, and the files left out.

    Raises `ImageFolderError` for an empty class folder, and for a non-image file unless
    `invalid_files` is "skip".
    """
    samples: list[tuple[str, int]] = []
    skipped: list[str] = []
    for index, name in enumerate(classes):
        folder = split_dir / name
        found = 0
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.startswith("."):
                    continue
                path = f"{dirpath}{os.sep}{filename}"
                if not filename.lower().endswith(IMAGE_EXTENSIONS):
                    if invalid_files == "error":
                        raise ImageFolderError(
                            f"{path} is not an image ({Path(filename).suffix or 'no extension'}); "
                            f"class folders hold only {', '.join(IMAGE_EXTENSIONS)} files. Remove "
                            f"it, or set data.invalid_files=skip to leave such files out."
                        )
                    skipped.append(path)
                    continue
                samples.append((path, index))
                found += 1
        if found == 0:
            raise ImageFolderError(
                f"class folder {folder} holds no image. Every class needs images in every split.\n"
                f"{layout_help(split_dir.parent)}"
            )
    return samples, skipped


class ImageFolderDataset(Dataset):
    """Images of one split with their class index.

    Args:
        samples: (path, class index) pairs from `scan_split`.
        transform: PIL image -> tensor.
        invalid_files: "error" (an undecodable image raises, naming it) or "skip" (the next
            image is returned instead and the file is logged).
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        invalid_files: str = "error",
    ) -> None:
        self.samples = list(samples)
        self.targets = [target for _, target in self.samples]
        self.transform = transform
        self.invalid_files = invalid_files
        self.failed: set[str] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, path: str) -> Image.Image:
        try:
            return read_rgb(path)  # the predictor's decode: EXIF orientation, 16-bit scaling
        except DECODE_ERRORS as error:
            raise ImageFolderError(
                f"{path} cannot be read as an image ({type(error).__name__}: {error}). Replace "
                f"or remove it, or set data.invalid_files=skip to skip unreadable images."
            ) from error

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.load(path)
            except ImageFolderError:
                if self.invalid_files == "error":
                    raise
                if path not in self.failed:
                    self.failed.add(path)
                    log.warning("Skipping unreadable image %s (%d so far)", path, len(self.failed))
                continue
            return (self.transform(image) if self.transform else image), target
        raise ImageFolderError(
            f"no image of this split could be read (first: {self.samples[0][0]})"
        )


class ImageFolderDataModule(L.LightningDataModule):
    """Train / val / test loaders of an image-folder data set with the DeiT transforms.

    Args:
        root: folder holding train/, val/ (and optionally test/); without train/ it can only
            be evaluated (classes from val/).
        kind: must be "classification" (every data config names the task kind it serves).
        num_classes: expected number of classes, checked against the class folders; None: the
            number of class folders.
        loader: batch sizes and loader settings (`pvtlab.data.loading.LoaderConfig`, or a mapping
            of its fields).
        transforms: image size and the training / evaluation transforms
            (`pvtlab.data.transforms.ClassificationTransformConfig`, or a mapping of its fields).
        drop_last: drop the last incomplete training batch (Mixup needs even batches).
        repeated_aug: copies of each image per epoch (DeiT: 3); 1 disables the sampler.
        invalid_files: "error" or "skip" for non-image or unreadable files (module docstring).
        seed: seed of the repeated-augmentation sampler's shuffling; None: the run's seed as
            `lightning.seed_everything` records it (`PL_GLOBAL_SEED`, the seed Lightning's own
            distributed sampler takes), else 0.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        kind: str = "classification",
        num_classes: int | None = None,
        loader: LoaderConfig | Mapping[str, Any] | None = None,
        transforms: ClassificationTransformConfig | Mapping[str, Any] | None = None,
        drop_last: bool = True,
        repeated_aug: int = 1,
        invalid_files: Literal["error", "skip"] = "error",
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if kind != "classification":
            raise ValueError(f"ImageFolderDataModule serves task=classification, not {kind}")
        if invalid_files not in INVALID_FILE_POLICIES:
            raise ValueError(
                f"data.invalid_files={invalid_files!r}; choose one of {INVALID_FILE_POLICIES}"
            )
        self.root = Path(root)
        self.loader = as_config(loader, LoaderConfig(batch_size=128), "data.loader")
        self.batch_size = int(self.loader.batch_size)
        self.eval_batch_size = int(self.loader.eval_batch_size or self.loader.batch_size)
        self.loading = self.loader.settings()
        self.transforms = as_config(transforms, ClassificationTransformConfig(), "data.transforms")
        self.image_size = int(self.transforms.image_size)
        self.drop_last = drop_last
        self.repeated_aug = int(repeated_aug)
        self.invalid_files = invalid_files
        self.seed = seed
        # Layout checks that read only folder names: fail at construction, before any training.
        self.classes = self._check_layout()
        check_num_classes(num_classes, len(self.classes), self.root, "class folders")
        self.num_classes = len(self.classes)
        self.class_names = tuple(self.classes)
        self.category_ids: list[int] | None = None
        # The label of each class folder: its position, or a model's label of its name.
        self.labels = list(range(self.num_classes))
        self.datasets: dict[str, ImageFolderDataset] = {}

    def use_model_classes(self, class_names: Sequence[str] | None, num_classes: int) -> None:
        """Label the class folders with a trained model's labels, matched by name (see
        `pvtlab.data.classes.label_mapping`); before any split is read."""
        self.labels = label_mapping(self.classes, class_names, num_classes, self.root)
        self.datasets.clear()

    def _split_dir(self, split: str) -> Path:
        """The folder of a split; test falls back to val when there is no test/."""
        if split == "test" and not (self.root / "test").is_dir():
            split = "val"
        return self.root / split

    def _check_layout(self) -> list[str]:
        if not self.root.is_dir():
            raise ImageFolderError(
                f"data.root={self.root} does not exist.\n{layout_help(self.root)}"
            )
        if not (self.root / "val").is_dir():
            raise ImageFolderError(f"{self.root} has no val/ folder.\n{layout_help(self.root)}")
        # Without train/ the folder can still be evaluated (e.g. a released pvt_*.pth on ImageNet
        # val): the classes come from val/, and asking for the train split raises.
        reference = self.root / ("train" if (self.root / "train").is_dir() else "val")
        classes = find_classes(reference)
        if not classes:
            raise ImageFolderError(f"{reference} holds no class folders.\n{layout_help(self.root)}")
        for split in ("val", "test"):
            split_dir = self.root / split
            if split_dir == reference or not split_dir.is_dir():
                continue
            other = find_classes(split_dir)
            if other != classes:
                only_ref = sorted(set(classes) - set(other))
                only_other = sorted(set(other) - set(classes))
                raise ImageFolderError(
                    f"the class folders of {split_dir} differ from those of {reference}: "
                    f"only in {reference.name}/: {only_ref[:10]}"
                    f"{' ...' if len(only_ref) > 10 else ''}; "
                    f"only in {split}/: {only_other[:10]}{' ...' if len(only_other) > 10 else ''}. "
                    f"Both splits need the same class folders."
                )
        return classes

    def transform(self, train: bool) -> Callable:
        return self.transforms.build(train)

    def dataset(self, split: str) -> ImageFolderDataset:
        """The dataset of `split` (train | val | test), read from disk on first use."""
        if split not in SPLITS:
            raise ValueError(f"split={split!r}; choose one of {SPLITS}")
        if split == "train" and not (self.root / "train").is_dir():
            raise ImageFolderError(
                f"{self.root} has no train/ folder: it can be evaluated, not trained on.\n"
                f"{layout_help(self.root)}"
            )
        if split not in self.datasets:
            samples, skipped = scan_split(self._split_dir(split), self.classes, self.invalid_files)
            samples = [(path, self.labels[index]) for path, index in samples]
            if skipped:
                log.warning(
                    "%s: left out %d non-image files (first: %s)",
                    self._split_dir(split),
                    len(skipped),
                    skipped[0],
                )
            self.datasets[split] = ImageFolderDataset(
                samples, self.transform(split == "train"), self.invalid_files
            )
        return self.datasets[split]

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self.dataset("train")
        if stage in (None, "fit", "validate"):
            self.dataset("val")
        if stage in (None, "test"):
            self.dataset("test")

    def _loader(self, dataset: Dataset, batch_size: int, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            **self.loading.for_processes(processes_on_this_node(self.trainer)).kwargs(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        dataset = self.dataset("train")
        if self.repeated_aug > 1:
            world, rank = self._world()
            sampler = RepeatAugSampler(
                dataset,
                world,
                rank,
                shuffle=True,
                num_repeats=self.repeated_aug,
                seed=self.sampler_seed(),
            )
            return self._loader(dataset, self.batch_size, sampler=sampler, drop_last=self.drop_last)
        return self._loader(dataset, self.batch_size, shuffle=True, drop_last=self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    def sampler_seed(self) -> int:
        """The seed of the repeated-augmentation shuffle (see `seed`); the same on every rank."""
        if self.seed is not None:
            return int(self.seed)
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    def _world(self) -> tuple[int, int]:
        """World size and global rank: from the Trainer when attached, else torch.distributed."""
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.world_size, trainer.global_rank
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0
