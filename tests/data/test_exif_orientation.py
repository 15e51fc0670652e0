"""The image-folder and ADE20K loaders read an EXIF-rotated photo as the predictor does."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pvtlab.data.imagefolder import ImageFolderDataset
from pvtlab.data.images import EXIF_ORIENTATION, read_rgb
from pvtlab.data.segmentation import SegmentationFolder

# Stored 48 wide and 32 high; orientation 6 shows it turned a quarter clockwise (32 x 48).
WIDTH, HEIGHT = 48, 32


def _marked_pixels() -> np.ndarray:
    """A stored picture whose left third is bright: after the turn, the top third is."""
    pixels = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    pixels[:, : WIDTH // 3] = 255
    return pixels


def _save_rotated_jpeg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    Image.fromarray(_marked_pixels()).save(path, quality=95, exif=exif)


def test_image_folder_decodes_like_the_predictor(tmp_path: Path) -> None:
    path = tmp_path / "val" / "a" / "photo.jpg"
    _save_rotated_jpeg(path)
    image = ImageFolderDataset([(str(path), 0)]).load(str(path))
    assert image.size == (HEIGHT, WIDTH)  # turned
    np.testing.assert_array_equal(np.asarray(image), np.asarray(read_rgb(path)))
    assert np.asarray(image)[: WIDTH // 3 - 2].min() > 200  # the bright third is on top


def test_segmentation_turns_the_label_map_with_its_image(tmp_path: Path) -> None:
    _save_rotated_jpeg(tmp_path / "images" / "validation" / "photo.jpg")
    label = np.ones((HEIGHT, WIDTH), np.uint8)
    label[:, : WIDTH // 3] = 2  # drawn on the stored pixels: class 2 where they are bright
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(label).save(tmp_path / "annotations" / "validation" / "photo.png")

    folder = SegmentationFolder(tmp_path, "validation", num_classes=2, transform=None)
    image, target = folder.load(0)
    expected = torch.from_numpy(
        np.array(read_rgb(tmp_path / "images" / "validation" / "photo.jpg"))
    )
    assert torch.equal(image, expected.permute(2, 0, 1))
    assert tuple(target.shape) == (WIDTH, HEIGHT)
    # reduce_zero_label: stored 2 is class 1; it lies under the bright pixels after the turn too.
    bright = image[0] > 127
    assert torch.equal(target == 1, bright)


def test_segmentation_keeps_a_label_map_drawn_on_the_turned_picture(tmp_path: Path) -> None:
    _save_rotated_jpeg(tmp_path / "images" / "validation" / "photo.jpg")
    label = np.ones((WIDTH, HEIGHT), np.uint8)
    label[: WIDTH // 3] = 2  # drawn as viewers show the photo: the bright third on top
    (tmp_path / "annotations" / "validation").mkdir(parents=True)
    Image.fromarray(label).save(tmp_path / "annotations" / "validation" / "photo.png")

    image, target = SegmentationFolder(tmp_path, "validation", num_classes=2, transform=None).load(
        0
    )
    assert torch.equal(target == 1, image[0] > 127)
