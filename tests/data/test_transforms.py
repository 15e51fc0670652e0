"""Classification transforms: the DeiT train pipeline and the resize-256 / crop-224 evaluation."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.transforms import RandomResizedCropAndInterpolation
from torchvision import transforms as T

from pvtlab.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PilToNormalizedFloat,
    RandomResizedCropUint8,
    classification_transform,
)


def _image(width: int = 400, height: int = 300) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _smooth_image(width: int = 500, height: int = 375) -> Image.Image:
    """A photo-like image: random colours at 1/16 the size, upsampled."""
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (height // 16, width // 16, 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BICUBIC)


def _steps(transform: T.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_train_transform_is_the_deit_recipe() -> None:
    transform = classification_transform(True, 224)
    steps = _steps(transform)
    assert steps[0] == "RandomResizedCropUint8"
    assert "RandomHorizontalFlip" in steps
    assert "RandAugment" in steps and "RandomErasing" in steps
    assert steps.index("PilToNormalizedFloat") == steps.index("RandomErasing") - 1
    crop = transform.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    rand_augment = transform.transforms[steps.index("RandAugment")]
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in rand_augment.ops)
    erasing = transform.transforms[steps.index("RandomErasing")]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    out = transform(_image())
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


@pytest.mark.parametrize("seed", range(8))
def test_uint8_crop_takes_timms_box_and_pillows_pixels(seed: int) -> None:
    image = _smooth_image()  # crops of 30-100% of its area: torch's kernel resamples them all
    reference = RandomResizedCropAndInterpolation(224, scale=(0.3, 1.0), interpolation="bicubic")
    faster = classification_transform(True, 224, scale=(0.3, 1.0)).transforms[0]
    assert isinstance(faster, RandomResizedCropUint8)
    random.seed(seed)
    expected = np.asarray(reference(image), dtype=np.int16)
    after_reference = random.random()
    random.seed(seed)
    got = np.asarray(faster(image), dtype=np.int16)
    assert random.random() == after_reference  # the same random numbers drawn
    difference = np.abs(got - expected)
    # Another box would differ by tens of levels. Torch's kernel rounds a few pixels otherwise
    # than Pillow's: no difference at all would mean that Pillow resampled.
    assert got.shape == (224, 224, 3) and 1 <= difference.max() <= 2
    assert difference.mean() < 0.1


def test_small_crops_stay_pillows() -> None:
    image = _smooth_image(64, 64)
    reference = RandomResizedCropAndInterpolation(64, interpolation="bicubic")
    faster = RandomResizedCropUint8(64, interpolation="bicubic")
    for seed in range(5):
        random.seed(seed)
        expected = np.asarray(reference(image))
        random.seed(seed)
        assert np.array_equal(np.asarray(faster(image)), expected)


def test_pil_to_normalized_float_is_to_tensor_then_normalize() -> None:
    image = _image(64, 48)
    expected = T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(T.ToTensor()(image))
    got = PilToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(image)
    assert got.dtype == torch.float32 and torch.allclose(got, expected, atol=1e-5)
    with pytest.raises(TypeError, match="3-channel 8-bit images; got a L image"):
        PilToNormalizedFloat(IMAGENET_MEAN, IMAGENET_STD)(image.convert("L"))


def test_posterize_keeping_no_bits_blackens_the_image() -> None:
    # At magnitude 10 RandAugment's increasing posterize keeps 0 bits; magnitude noise reaches
    # 10 about once in 700 images of the recipe, so this must not raise (Pillow 13 does).
    rand_augment = next(
        t
        for t in classification_transform(True, 64).transforms
        if type(t).__name__ == "RandAugment"
    )
    posterize = next(op for op in rand_augment.ops if op.name == "PosterizeIncreasing")
    posterize.prob, posterize.magnitude, posterize.magnitude_std = 1.0, 10, 0.0
    assert np.asarray(posterize(_image())).max() == 0  # the recipe's black image
    posterize.magnitude = 5  # 2 bits kept: the four levels 0, 64, 128, 192
    assert set(np.unique(np.asarray(posterize(_image())))) == {0, 64, 128, 192}


def test_auto_augment_policies_posterize_without_error() -> None:
    transform = classification_transform(True, 32, auto_augment="v0", re_prob=0.0)
    for _ in range(300):  # the v0 policy's posterize sub-policies keep 0 bits at low levels
        assert transform(_image(48, 40)).shape == (3, 32, 32)


def test_train_transform_options_switch_off() -> None:
    transform = classification_transform(
        True, 64, scale=(0.7, 1.0), auto_augment=None, re_prob=0.0, color_jitter=0.0
    )
    steps = _steps(transform)
    assert "RandAugment" not in steps and "RandomErasing" not in steps
    assert transform.transforms[0].scale == (0.7, 1.0)


def test_eval_transform_resizes_256_and_crops_224() -> None:
    transform = classification_transform(False, 224)
    resize = transform.transforms[0]
    assert isinstance(resize, T.Resize) and resize.size == 256
    assert resize.interpolation == T.InterpolationMode.BICUBIC
    assert isinstance(transform.transforms[1], T.CenterCrop)
    image = _image()
    out = transform(image)
    assert out.shape == (3, 224, 224)
    assert torch.equal(out, transform(image))  # deterministic
    # Normalised with the ImageNet statistics.
    grey = Image.new("RGB", (256, 256), (124, 116, 104))
    expected = (torch.tensor([124, 116, 104]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD
    )
    assert torch.allclose(transform(grey)[:, 100, 100], expected, atol=1e-5)


def test_full_frame_evaluation() -> None:
    out = classification_transform(False, 64, crop_pct=1.0)(_image(64, 64))
    assert out.shape == (3, 64, 64)
