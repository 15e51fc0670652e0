"""ADE20K's evaluation resize: the release's AlignResize (sides to multiples of 32)."""

from __future__ import annotations

import torch

from pvtlab.data.segmentation_transforms import EvalTransform, SegmentationTransformConfig


def test_eval_images_are_stretched_to_multiples_of_32() -> None:
    image = torch.rand(3, 300, 451)  # keep-ratio to shorter side 512: 512 x 770
    label = torch.zeros(300, 451, dtype=torch.uint8)
    aligned, kept = EvalTransform((2048, 512), size_divisor=32)(image, label)
    assert tuple(aligned.shape[-2:]) == (512, 800)
    assert tuple(kept.shape) == (300, 451)  # scored at the label's own size
    plain, _ = EvalTransform((2048, 512))(image, label)
    assert tuple(plain.shape[-2:]) == (512, 770)


def test_transform_config_passes_the_divisor() -> None:
    config = SegmentationTransformConfig(test_scale=(2048, 512), test_size_divisor=32)
    assert config.eval().size_divisor == 32
    assert SegmentationTransformConfig().eval().size_divisor == 1
