"""Prediction pictures: the drawing functions, and the PNGs a run writes for every task."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from omegaconf import open_dict
from PIL import Image

from pvtlab.pipeline import train
from pvtlab.visualization import (
    draw_classification,
    draw_detection,
    draw_segmentation,
    draw_tiles,
    save_grid,
    to_display,
)

NAMES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ellipse", "crescent")


def _images(n: int, size: int = 64) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _png_std(path) -> float:
    return float(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).std())


def test_to_display_stretches_each_channel_to_uint8() -> None:
    image = to_display(_images(1)[0] * 3 + 10)
    assert image.dtype == torch.uint8
    assert image.amin(dim=(1, 2)).tolist() == [0, 0, 0]
    assert image.amax(dim=(1, 2)).tolist() == [255, 255, 255]


def test_classification_tiles_name_the_truth_and_the_top5() -> None:
    scores = torch.zeros(2, 8)
    scores[0, 3], scores[1, 1] = 0.9, 0.8  # image 0 (a circle) taken for a star; image 1 right
    tiles = draw_classification(_images(2), torch.tensor([0, 1]), scores, NAMES)
    (picture, caption), (_, caption1) = tiles
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3 and min(picture.shape[1:]) >= 192
    lines = caption.splitlines()
    assert lines[0] == "true: circle (wrong)" and lines[1] == "star 0.90" and len(lines) == 6
    assert caption1.splitlines()[0] == "true: square (ok)"


def test_detection_tiles_show_predictions_beside_the_truth() -> None:
    images = list(_images(1))
    truth = {"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([2])}
    pred = {
        "boxes": torch.tensor([[10.0, 10.0, 50.0, 50.0], [0.0, 0.0, 5.0, 5.0]]),
        "scores": torch.tensor([0.9, 0.01]),
        "labels": torch.tensor([2, 5]),
    }
    ((picture, caption),) = draw_detection(images, [truth], [pred], NAMES, min_score=0.3)
    plain = to_display(images[0]).repeat_interleave(3, 1).repeat_interleave(3, 2)
    width = plain.shape[-1]
    left, right = picture[..., :width], picture[..., -width:]
    assert picture.shape[-1] > 2 * width  # two panels with a gap
    assert not torch.equal(left, plain) and not torch.equal(right, plain)
    assert not torch.equal(left, right)  # different boxes drawn on each side
    # The low-scoring box is still drawn (the best three always are): 2 of 2.
    assert caption.startswith("prediction (2 of 2 boxes)") and "ground truth (1)" in caption


def test_segmentation_tiles_colour_labelled_pixels_only() -> None:
    label = torch.full((64, 64), 255)
    label[16:48, 16:48] = 3
    pred = torch.full((64, 64), 3)
    pred[:, :32] = 1
    ((picture, caption),) = draw_segmentation(list(_images(1)), [label], [pred], NAMES)
    panel = picture.shape[-1] // 3
    image, predicted = picture[..., :panel], picture[..., panel + 2 : 2 * panel + 2]
    # Corners are unlabelled (255): the prediction panel leaves them as in the image.
    assert torch.equal(image[:, :30, :30], predicted[:, :30, :30])
    assert not torch.equal(image, predicted)
    assert "pixel acc 0.50" in caption and "true: star" in caption


def test_draw_tiles_rejects_an_unknown_kind() -> None:
    with pytest.raises(ValueError, match="kind='keypoints'"):
        draw_tiles({"kind": "keypoints"}, NAMES)


def test_save_grid_writes_a_png_that_is_not_blank(tmp_path) -> None:
    tiles = draw_classification(_images(5), torch.arange(5), torch.rand(5, 8), NAMES)
    path = save_grid(tiles, tmp_path / "sub" / "grid.png", title="val predictions, epoch 0")
    assert path.is_file() and _png_std(path) > 10


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classification", "detection", "segmentation"])
def test_a_run_draws_its_predictions_for_every_task(make_config, tmp_path, kind) -> None:
    # A small shapes set (a cache folder of its own settings beside the recipe's).
    cfg = make_config(
        [
            f"task={kind}",
            "trainer=debug",
            "data.generator.train_images=16",
            "data.generator.val_images=8",
            "data.loader.batch_size=4",
        ]
    )
    with open_dict(cfg):
        del cfg["hydra"]  # as @hydra.main hands it over
    train(cfg)
    folder = tmp_path / "run" / "predictions"
    for name in ("epoch000_val.png", "test.png"):
        assert (folder / name).is_file(), sorted(p.name for p in folder.glob("*"))
        assert _png_std(folder / name) > 10  # not blank
