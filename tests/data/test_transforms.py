"""Classification transforms: the DeiT train pipeline and the resize-256 / crop-224 evaluation."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pvtlab.data.transforms import IMAGENET_MEAN, IMAGENET_STD, classification_transform


def _image(width: int = 400, height: int = 300) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _steps(transform: T.Compose) -> list[str]:
    return [type(t).__name__ for t in transform.transforms]


def test_train_transform_is_the_deit_recipe() -> None:
    transform = classification_transform(True, 224)
    steps = _steps(transform)
    assert steps[0] == "RandomResizedCropAndInterpolation"
    assert "RandomHorizontalFlip" in steps
    assert "RandAugment" in steps and "RandomErasing" in steps
    crop = transform.transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == T.InterpolationMode.BICUBIC
    rand_augment = transform.transforms[steps.index("RandAugment")]
    assert all(op.magnitude == 9 and op.magnitude_std == 0.5 for op in rand_augment.ops)
    erasing = transform.transforms[steps.index("RandomErasing")]
    assert erasing.probability == 0.25 and erasing.mode == "pixel"
    out = transform(_image())
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32


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
