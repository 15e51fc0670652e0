"""ImageFolderDataModule: the ImageNet layout, its errors, loaders and the test-split fallback."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pvtlab.config import ConfigError
from pvtlab.data.imagefolder import ImageFolderDataModule, ImageFolderError
from pvtlab.data.loading import LoaderSettings
from pvtlab.data.samplers import RepeatAugSampler

CLASSES = ("n01", "n02", "n03")


def _write_image(path: Path, value: int, size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.full((size[1], size[0], 3), value, np.uint8)
    Image.fromarray(pixels).save(path)


def make_folder(root: Path, per_class: int = 4, splits: tuple[str, ...] = ("train", "val")) -> Path:
    for split in splits:
        for c, name in enumerate(CLASSES):
            for i in range(per_class):
                _write_image(root / split / name / f"{name}_{i}.JPEG", 40 * c + i)
    return root


def module(root: Path, **kwargs: object) -> ImageFolderDataModule:
    settings = {
        "transforms": {"image_size": 32},
        "loader": {"batch_size": 4, "num_workers": 0},
        **kwargs,
    }
    return ImageFolderDataModule(root, **settings)


def test_loads_the_layout(tmp_path: Path) -> None:
    dm = module(make_folder(tmp_path), num_classes=3)
    assert dm.classes == list(CLASSES) and dm.num_classes == 3
    dm.setup("fit")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 32, 32) and images.dtype == torch.float32
    assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1, 2}
    val_images, val_labels = next(iter(dm.val_dataloader()))
    assert val_images.shape == (4, 3, 32, 32)
    assert val_labels.tolist() == [0, 0, 0, 0]  # sorted, unshuffled
    assert len(dm.dataset("train")) == 12


def test_test_split_defaults_to_val(tmp_path: Path) -> None:
    dm = module(make_folder(tmp_path, per_class=2))
    assert len(dm.dataset("test")) == 6
    make_folder(tmp_path / "with_test", per_class=1, splits=("train", "val", "test"))
    assert module(tmp_path / "with_test")._split_dir("test").name == "test"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_root", "does not exist"),
        ("no_val", "has no val/ folder"),
        ("no_classes", "holds no class folders"),
    ],
)
def test_malformed_root_shows_the_layout(tmp_path: Path, damage: str, message: str) -> None:
    root = tmp_path / "imagenet"
    if damage == "no_val":
        make_folder(root, splits=("train",))
    elif damage == "no_classes":
        (root / "train").mkdir(parents=True)
        (root / "val").mkdir()
    with pytest.raises(ImageFolderError, match=message) as error:
        module(root)
    assert "train/<class>/" in str(error.value) and "val/<class>/" in str(error.value)


def test_class_sets_must_agree(tmp_path: Path) -> None:
    make_folder(tmp_path)
    _write_image(tmp_path / "val" / "n99" / "x.JPEG", 0)
    with pytest.raises(ImageFolderError, match=r"only in val/: \['n99'\]"):
        module(tmp_path)


def test_num_classes_must_agree(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data.num_classes=1000 but .* has 3 class folders"):
        module(make_folder(tmp_path), num_classes=1000)


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path)
    for path in (tmp_path / "val" / "n02").iterdir():
        path.unlink()
    dm = module(tmp_path)
    with pytest.raises(ImageFolderError, match=r"val/n02 holds no image"):
        dm.setup("validate")


def test_non_image_files_error_or_are_skipped(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "train" / "n01" / "notes.txt").write_text("not an image")
    with pytest.raises(ImageFolderError, match=r"n01/notes.txt is not an image"):
        module(tmp_path).setup("fit")
    dm = module(tmp_path, invalid_files="skip")
    dm.setup("fit")
    assert len(dm.dataset("train")) == 12


def test_unreadable_images_error_or_are_skipped(tmp_path: Path) -> None:
    make_folder(tmp_path)
    broken = tmp_path / "val" / "n01" / "n01_0.JPEG"
    broken.write_bytes(b"\xff\xd8 truncated")
    dataset = module(tmp_path).dataset("val")
    with pytest.raises(ImageFolderError, match=r"n01_0\.JPEG cannot be read"):
        dataset[0]
    skipping = module(tmp_path, invalid_files="skip").dataset("val")
    image, label = skipping[0]  # the next image instead
    assert image.shape == (3, 32, 32) and label == 0
    assert skipping.failed == {str(broken)}


def test_invalid_policy_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="choose one of"):
        module(make_folder(tmp_path), invalid_files="ignore")


def test_repeated_augmentation_uses_the_sampler(tmp_path: Path) -> None:
    dm = module(make_folder(tmp_path), repeated_aug=3)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RepeatAugSampler)
    assert loader.sampler.num_repeats == 3 and len(loader.sampler) == 12
    assert isinstance(module(tmp_path).train_dataloader().sampler, torch.utils.data.RandomSampler)


def test_loader_defaults(tmp_path: Path) -> None:
    dm = ImageFolderDataModule(make_folder(tmp_path), transforms={"image_size": 32})
    assert dm.loading == LoaderSettings.resolve()


def test_repeated_augmentation_shuffles_from_the_run_seed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_folder(tmp_path)
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")  # what lightning.seed_everything(7) records

    def order(**kwargs: object) -> list[int]:
        return list(module(root, repeated_aug=3, **kwargs).train_dataloader().sampler)

    assert module(root).sampler_seed() == 7 and module(root, seed=3).sampler_seed() == 3
    assert order() == order()  # the same seed, the same epoch: the same stream
    assert order() == order(seed=7) != order(seed=3)
    monkeypatch.delenv("PL_GLOBAL_SEED")
    assert module(root).sampler_seed() == 0
