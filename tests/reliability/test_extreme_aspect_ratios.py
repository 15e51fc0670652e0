"""Very long, thin pictures go through every task's training and evaluation transforms, at the
sizes of the shapes recipes and of the paper's (ImageNet, COCO, ADE20K) recipes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors

RECIPES = [
    ("shapes", "classification", None),
    ("imagenet", "classification", None),
    ("shapes", "detection", "retinanet"),
    ("shapes", "detection", "detr"),
    ("coco", "detection", "mask_rcnn"),
    ("coco", "detection", "detr"),
    ("shapes", "segmentation", "semantic_fpn"),
    ("ade20k", "segmentation", "trans2seg"),
]
# (width, height): a 4000 x 3 strip under a 1333-pixel cap rounded its short side to 0.
SIZES = [(4000, 3), (3, 4000), (10000, 1), (1, 1)]


def _run(task: str, transform: Callable, width: int, height: int) -> Tensor:
    if task == "classification":
        return transform(Image.new("RGB", (width, height), (120, 30, 200)))
    pixels = torch.full((3, height, width), 100, dtype=torch.uint8)
    if task == "detection":
        boxes = tv_tensors.BoundingBoxes(
            torch.tensor([[0.0, 0.0, width, height]]), format="XYXY", canvas_size=(height, width)
        )
        return transform(tv_tensors.Image(pixels), {"boxes": boxes, "labels": torch.tensor([1])})[0]
    return transform(pixels, torch.ones((height, width), dtype=torch.uint8))[0]


def _transforms(task: str, config: Any) -> dict[str, Callable]:
    if task == "classification":
        return {"train": config.build(True), "eval": config.build(False)}
    if task == "detection":
        return {"train": config.train(), "eval": config.eval()}
    return {"train": config.train(255), "eval": config.eval()}


@pytest.mark.parametrize(("data", "task", "head"), RECIPES, ids=lambda v: str(v))
def test_thin_pictures_are_resized(
    make_config: Callable[..., DictConfig], data: str, task: str, head: str | None
) -> None:
    overrides = [f"data={data}", f"task={task}"] + ([f"head={head}"] if head else [])
    config = instantiate(make_config(overrides).data.transforms)
    for stage, transform in _transforms(task, config).items():
        for width, height in SIZES:
            image = _run(task, transform, width, height)
            assert image.ndim == 3 and min(image.shape[-2:]) >= 1, (stage, width, height)
            assert torch.isfinite(image).all()
