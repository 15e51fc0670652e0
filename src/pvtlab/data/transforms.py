"""Image-classification transforms (the DeiT recipe through timm) and the shared normalisation.

Training: RandomResizedCrop (bicubic), horizontal flip, RandAugment, normalisation, random
erasing. Evaluation: resize the shorter side to ``image_size / crop_pct`` (256 for 224 at the
default 0.875), centre crop, normalise. Mixup / CutMix act on whole batches and live in the task.

timm builds both, with two steps swapped for ones that draw the same random numbers: the
training crop is resampled by torch's vectorised uint8 kernel instead of Pillow's, and in both,
tensor conversion and normalisation are one pass over the pixels. The evaluation resize stays Pillow's, the protocol the released
weights were scored with.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image
from timm.data import auto_augment, create_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.transforms import MaybeToTensor, RandomResizedCropAndInterpolation
from torch.nn import functional as F
from torchvision.transforms import InterpolationMode, Normalize
from torchvision.transforms.v2 import functional as TF

# ImageNet statistics: every pvtlab backbone is trained (and released weights were) with these.
IMAGENET_MEAN: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_MEAN)
IMAGENET_STD: tuple[float, float, float] = tuple(IMAGENET_DEFAULT_STD)


def normalize_pixels(
    image: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """``(image - mean) / std`` per channel of a ``[..., C, H, W]`` image of any dtype (uint8
    included), as float32, in one multiply-add over the pixels: `mean` and `std` on the image's
    own scale (e.g. 0-255 for uint8)."""
    std_t = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
    shift = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std_t
    return torch.addcmul(shift, image, 1 / std_t)


class RandomResizedCropUint8(RandomResizedCropAndInterpolation):
    """timm's RandomResizedCropAndInterpolation (the same crop boxes from the same random
    numbers), resampled on the uint8 pixels by torch's antialiased bilinear or bicubic kernel,
    which is vectorised. The pixels differ from Pillow's by rounding, at most a few levels at
    sharp edges. Pillow still resamples small crops (under `TORCH_MIN_PIXELS`, where torch's
    fixed cost per call outweighs its kernel), other filters, and images that are not RGB."""

    TORCH_MIN_PIXELS = 128 * 128

    def __call__(self, image: Image.Image) -> Image.Image:
        top, left, height, width = self.get_params(image, self.scale, self.ratio)
        interpolation = self.interpolation
        if isinstance(interpolation, tuple | list):
            interpolation = random.choice(interpolation)
        mode = _TORCH_RESAMPLING.get(interpolation)
        if mode is None or image.mode != "RGB" or height * width < self.TORCH_MIN_PIXELS:
            return TF.resized_crop(image, top, left, height, width, list(self.size), interpolation)
        crop = TF.pil_to_tensor(image)[:, top : top + height, left : left + width]
        resized = F.interpolate(
            crop[None], size=self.size, mode=mode, antialias=True, align_corners=False
        )
        return Image.fromarray(resized[0].permute(1, 2, 0).numpy())


_TORCH_RESAMPLING = {InterpolationMode.BILINEAR: "bilinear", InterpolationMode.BICUBIC: "bicubic"}


class PilToNormalizedFloat:
    """A PIL image to a float32 (C, H, W) tensor normalised by `mean` and `std` (0-1 scale):
    torchvision's ToTensor then Normalize, in one multiply-add from the uint8 pixels."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._pixel_mean = [255 * m for m in self.mean]
        self._pixel_std = [255 * s for s in self.std]

    def __call__(self, image: Image.Image) -> torch.Tensor:
        pixels = TF.pil_to_tensor(image)
        if pixels.dtype != torch.uint8 or pixels.shape[0] != len(self.mean):
            raise TypeError(
                f"PilToNormalizedFloat takes {len(self.mean)}-channel 8-bit images; got a "
                f"{image.mode} image"
            )
        return normalize_pixels(pixels, self._pixel_mean, self._pixel_std)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mean={self.mean}, std={self.std})"


# The paper's evaluation crop: resize 256, centre crop 224.
DEFAULT_CROP_PCT = 224 / 256


def classification_transform(
    train: bool,
    image_size: int = 224,
    *,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    auto_augment: str | None = "rand-m9-mstd0.5-inc1",
    color_jitter: float = 0.4,
    re_prob: float = 0.25,
    re_mode: str = "pixel",
    re_count: int = 1,
    interpolation: str = "bicubic",
    crop_pct: float = DEFAULT_CROP_PCT,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable:
    """The train or eval transform of a PIL image into a normalised (3, size, size) tensor.

    Args:
        train: augmenting training transform, or the deterministic evaluation one.
        image_size: output side.
        scale, ratio: RandomResizedCrop's area fraction and aspect range.
        hflip: horizontal-flip probability.
        auto_augment: a timm policy string (`rand-m9-mstd0.5-inc1` = RandAugment magnitude 9,
            magnitude noise 0.5, increasing severity); None or "" for none.
        color_jitter: used only without `auto_augment` (timm ignores it otherwise).
        re_prob, re_mode, re_count: random erasing after normalisation.
        interpolation: resize interpolation (`bicubic` in the recipe).
        crop_pct: evaluation centre-crop fraction.
        mean, std: normalisation.
    """
    transform = create_transform(
        input_size=int(image_size),
        is_training=train,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        auto_augment=auto_augment or None,
        color_jitter=color_jitter,
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
        interpolation=interpolation,
        crop_pct=crop_pct,
        mean=tuple(mean),
        std=tuple(std),
    )
    _posterize_zero_bits_to_black(transform)
    _use_faster_pixel_steps(transform.transforms, mean, std)
    return transform


@dataclass(frozen=True)
class ClassificationTransformConfig:
    """The `transforms:` group of an image-folder data config.

    Args:
        image_size: training crop and evaluation size.
        train: keyword arguments of `classification_transform` for training.
        eval: keyword arguments of `classification_transform` for evaluation.
    """

    image_size: int = 224
    train: Mapping[str, Any] = field(default_factory=dict)
    eval: Mapping[str, Any] = field(default_factory=dict)

    def build(self, train: bool) -> Callable:
        """The training (`train=True`) or evaluation transform."""
        return classification_transform(
            train, self.image_size, **(self.train if train else self.eval)
        )


def _use_faster_pixel_steps(steps: list[Any], mean: Sequence[float], std: Sequence[float]) -> None:
    """Swap, in timm's list of steps, its random resized crop for `RandomResizedCropUint8` and
    its ToTensor + Normalize(mean, std) pair for `PilToNormalizedFloat`."""
    for index, step in enumerate(steps):
        if type(step) is RandomResizedCropAndInterpolation:
            faster = RandomResizedCropUint8(step.size, step.scale, step.ratio)
            faster.interpolation = step.interpolation
            steps[index] = faster
    for index in range(len(steps) - 2, -1, -1):
        to_tensor, normalize = steps[index : index + 2]
        if isinstance(to_tensor, MaybeToTensor) and isinstance(normalize, Normalize):
            steps[index : index + 2] = [PilToNormalizedFloat(mean, std)]


def _posterize(img: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize as it ran under Pillow < 13, the recipe's: keeping 0 bits gives a black
    image. (Pillow 13 raises instead, and RandAugment's increasing posterize keeps 0 bits at
    magnitude 10, which magnitude noise reaches: about 1 image in 700 with rand-m9-mstd0.5-inc1,
    so an ImageNet epoch would stop within its first batches.)"""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep)


def _posterize_zero_bits_to_black(transform: Any) -> None:
    """Point every posterize op of the auto-augment policies inside `transform` (a Compose of
    timm's RandAugment, AutoAugment or AugMix) at `_posterize`."""
    children = [
        *getattr(transform, "transforms", ()),
        *getattr(transform, "ops", ()),
        *(op for sub_policy in getattr(transform, "policy", ()) for op in sub_policy),
    ]
    if getattr(transform, "aug_fn", None) is auto_augment.posterize:
        transform.aug_fn = _posterize
    for child in children:
        _posterize_zero_bits_to_black(child)
