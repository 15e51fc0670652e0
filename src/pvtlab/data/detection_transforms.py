"""Joint image, box and mask transforms of the COCO detection recipes (docs/paper.md section 3).

The data pipeline is the one place where detection images are resized (as in mmdetection):
training resizes the shorter side to a size drawn from `short_sides` (one value: single scale,
800 for COCO 1x; 640..800 for 3x + multi-scale) with the longer side capped at `max_size` (1333),
flips horizontally, converts to float and normalizes with ImageNet statistics; evaluation does the
same at one size and without the flip. Boxes and masks follow the image through
`torchvision.transforms.v2` and `tv_tensors`. Heads receive the resized, normalized images as they
are and pad a batch to a multiple of 32 (`pad_images`; torchvision's detectors do the same in
their batching), so every box a head returns is in the pixels of the image it was given.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from pvtlab.data.transforms import normalize_pixels

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SIZE_DIVISOR = 32


def short_side_choices(sides: Sequence[int], mode: str = "choice") -> list[int]:
    """The shorter-side sizes training draws from.

    `mode="choice"`: one of `sides` (e.g. [800], or DETR's 480..800 step 32).
    `mode="range"`: any integer from min(sides) to max(sides) (mmdetection's
    `multiscale_mode="range"`, the released 3x + multi-scale setting [640, 800]).
    """
    sides = [int(s) for s in sides]
    if not sides or min(sides) < 1:
        raise ValueError(f"short sides {sides}: need at least one positive size")
    if mode == "choice":
        return sides
    if mode == "range":
        return list(range(min(sides), max(sides) + 1))
    raise ValueError(f"short side mode {mode!r}: choose 'choice' or 'range'")


class ToNormalizedFloat(v2.Transform):
    """uint8 images to float32 normalized by `mean` and `std` (on the 0-1 scale): `v2.ToDtype`
    with scaling then `v2.Normalize`, in one pass over the pixels. Boxes and masks pass
    through."""

    _transformed_types = (tv_tensors.Image,)

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.mean = tuple(255 * m for m in mean)
        self.std = tuple(255 * s for s in std)

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        if inpt.dtype != torch.uint8:
            raise TypeError(f"ToNormalizedFloat takes uint8 images; got {inpt.dtype}")
        normalized = normalize_pixels(inpt.as_subclass(Tensor), self.mean, self.std)
        return tv_tensors.wrap(normalized, like=inpt)


class ShortestSizeResize(v2.RandomShortestSize):
    """`v2.RandomShortestSize` whose sides are at least one pixel: a very long, thin picture
    (4000 x 3 under a longer-side cap of 1333) would round its short side to 0 and crash."""

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        params = super().make_params(flat_inputs)
        params["size"] = [max(1, int(side)) for side in params["size"]]
        return params


def detection_transforms(
    short_sides: Sequence[int],
    max_size: int | None,
    flip_prob: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Resize (shorter side from `short_sides`, longer capped at `max_size`), flip, normalize.

    Called on `(tv_tensors.Image uint8, {"boxes": BoundingBoxes, "masks": Mask, ...})`; other
    target entries pass through unchanged.
    """
    steps: list[v2.Transform] = [ShortestSizeResize(list(short_sides), max_size=max_size)]
    if flip_prob > 0:
        steps.append(v2.RandomHorizontalFlip(p=flip_prob))
    steps.append(ToNormalizedFloat(mean, std))
    return v2.Compose(steps)


@dataclass(frozen=True)
class DetectionTransformConfig:
    """The `transforms:` group of a COCO-format data config.

    Args:
        train_short_side: shorter-side sizes of training (see `short_side_choices`).
        train_short_side_mode: "choice" (one of them) or "range" (any size between them).
        max_size: cap on the longer side, in training and evaluation (None: no cap).
        test_short_side: shorter side at evaluation.
        flip_prob: horizontal-flip probability in training.
        mean, std: normalization, on the [0, 1] scale.
    """

    train_short_side: Sequence[int] = (800,)
    train_short_side_mode: Literal["choice", "range"] = "choice"
    max_size: int | None = 1333
    test_short_side: int = 800
    flip_prob: float = 0.5
    mean: Sequence[float] = IMAGENET_MEAN
    std: Sequence[float] = IMAGENET_STD

    def __post_init__(self) -> None:
        # Checked here, not at the first batch: a bad mode fails when the config is built.
        short_side_choices(self.train_short_side, self.train_short_side_mode)

    def train(self) -> v2.Compose:
        sides = short_side_choices(self.train_short_side, self.train_short_side_mode)
        return detection_transforms(sides, self.max_size, self.flip_prob, self.mean, self.std)

    def eval(self) -> v2.Compose:
        return detection_transforms([self.test_short_side], self.max_size, 0.0, self.mean, self.std)


def pad_images(
    images: Sequence[Tensor], size_divisor: int = SIZE_DIVISOR, value: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Batch (C, H, W) images of different sizes: pad bottom and right to a common size that is
    a multiple of `size_divisor`. Returns the batch (B, C, H, W) and a (B, H, W) bool mask that is
    True on padding (DETR's convention). Normalized images pad with 0, the mean colour."""
    height = max(int(im.shape[-2]) for im in images)
    width = max(int(im.shape[-1]) for im in images)
    height = -(-height // size_divisor) * size_divisor
    width = -(-width // size_divisor) * size_divisor
    batch = images[0].new_full((len(images), images[0].shape[0], height, width), value)
    padding = torch.ones(len(images), height, width, dtype=torch.bool, device=images[0].device)
    for i, image in enumerate(images):
        h, w = image.shape[-2:]
        batch[i, :, :h, :w] = image
        padding[i, :h, :w] = False
    return batch, padding
