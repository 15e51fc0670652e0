"""Joint image + label-map transforms of the ADE20K recipe (docs/paper.md section 3).

Training: ratio resize of scale (2048, 512) x U(0.5, 2.0), random 512 x 512 crop in which one class
covers at most 75% of the labelled pixels, horizontal flip, photometric distortion, normalize, pad
the image with 0 and the label with the ignore index to the crop size. Test: the same keep-ratio
resize at ratio 1 (shorter side 512 unless the longer would pass 2048), normalize; the label keeps
its original size, since predictions are scored at the label's own resolution.

Images are `(3, H, W)` uint8 tensors, labels `(H, W)` uint8 / int64 tensors. Randomness comes from
torch's generator, which Lightning seeds per dataloader worker.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.transforms import InterpolationMode

from pvtlab.data.transforms import normalize_pixels

IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand(()))


def _chance(prob: float) -> bool:
    return float(torch.rand(())) < prob


def keep_ratio_size(height: int, width: int, scale: Sequence[int]) -> tuple[int, int]:
    """Size of the largest keep-ratio resize whose long side <= max(scale), short <= min(scale)."""
    long_max, short_max = max(scale), min(scale)
    factor = min(long_max / max(height, width), short_max / min(height, width))
    return max(1, int(height * factor + 0.5)), max(1, int(width * factor + 0.5))


def resize_pair(
    image: Tensor, label: Tensor | None, size: tuple[int, int]
) -> tuple[Tensor, Tensor | None]:
    """Bilinear image, nearest-neighbour label."""
    image = TF.resize(image, list(size), interpolation=InterpolationMode.BILINEAR, antialias=True)
    if label is not None:
        label = TF.resize(label[None], list(size), interpolation=InterpolationMode.NEAREST_EXACT)[0]
    return image, label


class RandomRatioResize:
    """Keep-ratio resize to `scale` times a random ratio drawn from `ratio_range`."""

    def __init__(
        self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0)
    ) -> None:
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        ratio = _uniform(*self.ratio_range)
        scale = (int(self.scale[0] * ratio), int(self.scale[1] * ratio))
        return resize_pair(image, label, keep_ratio_size(*image.shape[-2:], scale))


class RandomCropCatMax:
    """Random crop of `size` (smaller images are kept whole along that side).

    Up to `attempts` crops are drawn; the first in which at least two classes occur and the most
    frequent class covers less than `cat_max_ratio` of the labelled pixels is kept, else the last.
    """

    def __init__(
        self,
        size: Sequence[int] = (512, 512),
        cat_max_ratio: float = 0.75,
        ignore_index: int = 255,
        attempts: int = 10,
    ) -> None:
        self.size = tuple(size)
        self.cat_max_ratio = cat_max_ratio
        self.ignore_index = ignore_index
        self.attempts = attempts

    def _box(self, height: int, width: int) -> tuple[int, int, int, int]:
        crop_h, crop_w = min(self.size[0], height), min(self.size[1], width)
        top = int(torch.randint(0, height - crop_h + 1, ()))
        left = int(torch.randint(0, width - crop_w + 1, ()))
        return top, left, crop_h, crop_w

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        height, width = label.shape
        top, left, crop_h, crop_w = self._box(height, width)
        if self.cat_max_ratio < 1.0:
            for _ in range(self.attempts):
                window = label[top : top + crop_h, left : left + crop_w]
                counts = torch.bincount(window.reshape(-1))
                if self.ignore_index < counts.numel():
                    counts[self.ignore_index] = 0
                counts = counts[counts > 0]
                if counts.numel() > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                    break
                top, left, crop_h, crop_w = self._box(height, width)
        return (
            image[:, top : top + crop_h, left : left + crop_w],
            label[top : top + crop_h, left : left + crop_w],
        )


class RandomHorizontalFlip:
    def __init__(self, prob: float = 0.5) -> None:
        self.prob = prob

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        if _chance(self.prob):
            return image.flip(-1), label.flip(-1)
        return image, label


# Hue sextant offsets of the red, green and blue channels in the HSV -> RGB formula.
_HUE_CHANNEL_OFFSETS = (5.0, 3.0, 1.0)


def shift_hue(image: Tensor, shift: float) -> Tensor:
    """`image` (float RGB, ``[..., 3, H, W]``, any non-negative range) with its HSV hue turned by
    `shift` of the colour circle: torchvision's `adjust_hue` to float rounding, without building
    the HSV image. Value and saturation stay."""
    r, g, b = image.unbind(-3)
    top = image.amax(-3)  # HSV value
    chroma = top - image.amin(-3)  # value x saturation
    safe = torch.where(chroma > 0, chroma, 1.0)  # grey pixels have no hue: chroma 0 below
    sextant = torch.where(
        top == r, (g - b) / safe, torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4)
    )  # hue x 6
    offsets = torch.tensor(_HUE_CHANNEL_OFFSETS, device=image.device).view(3, 1, 1)
    k = (sextant.unsqueeze(-3) + (offsets + 6 * shift)).remainder_(6)
    return top.unsqueeze(-3) - chroma.unsqueeze(-3) * torch.minimum(k, 4 - k).clamp_(0, 1)


class PhotometricDistortion:
    """Brightness, contrast, saturation and hue jitter, each applied with probability 0.5.

    As in the ADE20K recipe: brightness adds a delta in [-32, 32] (0-255 scale), contrast
    multiplies by [0.5, 1.5], saturation by [0.5, 1.5], hue shifts by up to 18 of 180 degrees;
    contrast comes first or last at random. Works on float images in [0, 255]. Saturation uses
    torchvision's blend with the grey image rather than scaling the S channel of HSV.
    """

    def __init__(
        self,
        brightness_delta: float = 32.0,
        contrast_range: Sequence[float] = (0.5, 1.5),
        saturation_range: Sequence[float] = (0.5, 1.5),
        hue_delta: float = 18.0,
    ) -> None:
        self.brightness_delta = brightness_delta
        self.contrast_range = tuple(contrast_range)
        self.saturation_range = tuple(saturation_range)
        self.hue_delta = hue_delta

    def __call__(self, image: Tensor) -> Tensor:
        image = image.float()
        if _chance(0.5):
            image = (image + _uniform(-self.brightness_delta, self.brightness_delta)).clamp(0, 255)
        contrast_first = _chance(0.5)
        if contrast_first and _chance(0.5):
            image = (image * _uniform(*self.contrast_range)).clamp(0, 255)
        if _chance(0.5):
            image = TF.adjust_saturation(image / 255, _uniform(*self.saturation_range)) * 255
        if _chance(0.5):
            # Hue offset as a fraction of the colour circle (18 of OpenCV's 180 degrees = 0.1).
            image = shift_hue(image, _uniform(-self.hue_delta, self.hue_delta) / 180)
        if not contrast_first and _chance(0.5):
            image = (image * _uniform(*self.contrast_range)).clamp(0, 255)
        return image.clamp(0, 255)


def normalize(
    image: Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> Tensor:
    """Image on the 0-255 scale (float or uint8) to zero mean, unit variance per channel."""
    return normalize_pixels(image, mean, std)


def pad_pair(
    image: Tensor, label: Tensor, size: Sequence[int], ignore_index: int = 255
) -> tuple[Tensor, Tensor]:
    """Pad bottom / right to at least `size`: image with 0 (after normalization), label with ignore."""
    pad_h = max(0, size[0] - image.shape[-2])
    pad_w = max(0, size[1] - image.shape[-1])
    if pad_h == 0 and pad_w == 0:
        return image, label
    image = torch.nn.functional.pad(image, (0, pad_w, 0, pad_h), value=0.0)
    label = torch.nn.functional.pad(label, (0, pad_w, 0, pad_h), value=ignore_index)
    return image, label


class TrainTransform:
    """The training pipeline: ratio resize, cat-max crop, flip, photometric distortion, normalize, pad."""

    def __init__(
        self,
        crop_size: Sequence[int] = (512, 512),
        scale: Sequence[int] = (2048, 512),
        ratio_range: Sequence[float] = (0.5, 2.0),
        cat_max_ratio: float = 0.75,
        flip_prob: float = 0.5,
        photometric: bool = True,
        ignore_index: int = 255,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        self.crop_size = tuple(crop_size)
        self.resize = RandomRatioResize(scale, ratio_range)
        self.crop = RandomCropCatMax(crop_size, cat_max_ratio, ignore_index)
        self.flip = RandomHorizontalFlip(flip_prob)
        self.photometric = PhotometricDistortion() if photometric else None
        self.ignore_index = ignore_index
        self.mean, self.std = tuple(mean), tuple(std)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        image, label = self.resize(image, label)
        image, label = self.crop(image, label)
        image, label = self.flip(image, label)
        image = self.photometric(image) if self.photometric is not None else image
        image = normalize(image, self.mean, self.std)
        return pad_pair(image, label.long(), self.crop_size, self.ignore_index)


def align_size(size: tuple[int, int], divisor: int) -> tuple[int, int]:
    """Each side rounded up to a multiple of `divisor` (1: unchanged)."""
    return tuple(math.ceil(s / divisor) * divisor for s in size)  # type: ignore[return-value]


class EvalTransform:
    """Keep-ratio resize of the image to `scale` (shorter side 512 for ADE20K), each side then
    stretched up to a multiple of `size_divisor`, and normalize.

    `size_divisor=32` is the release's `AlignResize`: the network sees whole stride-32 grids
    instead of a padded input. The release resizes twice (keep-ratio, then to the aligned size);
    here the image is resized once, straight to the aligned size. The label keeps its own size.
    """

    def __init__(
        self,
        scale: Sequence[int] = (2048, 512),
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        size_divisor: int = 1,
    ) -> None:
        self.scale = tuple(scale)
        self.mean, self.std = tuple(mean), tuple(std)
        self.size_divisor = int(size_divisor)

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        size = align_size(keep_ratio_size(*image.shape[-2:], self.scale), self.size_divisor)
        image, _ = resize_pair(image, None, size)
        return normalize(image, self.mean, self.std), label.long()


@dataclass(frozen=True)
class SegmentationTransformConfig:
    """The `transforms:` group of a segmentation data config.

    Args:
        crop_size: (height, width) of the training crops.
        scale: keep-ratio resize target (long side, short side) before the random ratio.
        ratio_range: (min, max) factor drawn for `scale` in training.
        cat_max_ratio: largest share of a crop's labelled pixels one class may cover.
        flip_prob: horizontal-flip probability in training.
        photometric: mmseg's photometric distortion in training.
        test_scale: keep-ratio resize at evaluation (None: `scale`).
        test_size_divisor: evaluation images stretched to a multiple of this (32: the
            release's `AlignResize`; 1: no stretching).
    """

    crop_size: Sequence[int] = (512, 512)
    scale: Sequence[int] = (2048, 512)
    ratio_range: Sequence[float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    test_scale: Sequence[int] | None = None
    test_size_divisor: int = 1

    def train(self, ignore_index: int = 255) -> TrainTransform:
        """The training pipeline; crops are padded with `ignore_index` in the label map."""
        return TrainTransform(
            self.crop_size,
            self.scale,
            self.ratio_range,
            self.cat_max_ratio,
            self.flip_prob,
            self.photometric,
            ignore_index,
        )

    def eval(self) -> EvalTransform:
        return EvalTransform(self.test_scale or self.scale, size_divisor=self.test_size_divisor)


def padded_size(sizes: Sequence[Sequence[int]], divisor: int = 1) -> tuple[int, int]:
    """The smallest (H, W) holding every size, rounded up to `divisor`."""
    height = max(s[0] for s in sizes)
    width = max(s[1] for s in sizes)
    return math.ceil(height / divisor) * divisor, math.ceil(width / divisor) * divisor
