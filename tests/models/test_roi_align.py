"""pvtlab's RoIAlign: torchvision's forward, and a CPU backward by matrix products that equals
torchvision's backward kernel."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import pytest
import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align

from pvtlab.models.heads import roi_align as module
from pvtlab.models.heads.roi_align import (
    MultiScaleRoIAlignFastBackward,
    RoIAlignSettings,
    roi_align,
    use_products,
)


def _rois(count: int, images: int, map_size: int, scale: float, seed: int) -> Tensor:
    """(count, 5) RoIs in image pixels: some reach past the map's edges, some under a pixel wide,
    some inverted (x2 < x1, y2 < y1), image indices unsorted, the last image without any RoI."""
    generator = torch.Generator().manual_seed(seed)
    image_size = map_size / scale
    corner = torch.rand(count, 2, generator=generator) * (image_size * 1.2) - 0.1 * image_size
    size = torch.rand(count, 2, generator=generator) * image_size * 0.6
    size[: count // 8] *= 0.01  # degenerate RoIs
    size[-(count // 8) :] *= -1  # inverted: no samples when aligned, one pixel wide when not
    image = torch.randint(0, images - 1, (count, 1), generator=generator).float()
    return torch.cat([image, corner, corner + size], dim=1)


def _feature_gradients(
    pool: Callable[[Tensor, Tensor], Tensor], features: Tensor, rois: Tensor, grad: Tensor
) -> tuple[Tensor, Tensor, str]:
    """The pooled output, the features' gradient and the name of the output's backward node."""
    features = features.detach().requires_grad_()
    out = pool(features, rois)
    node = type(out.grad_fn).__name__
    out.backward(grad)
    return out.detach(), features.grad, node


@pytest.mark.parametrize(
    ("output_size", "sampling_ratio", "aligned"),
    [((7, 7), 0, False), ((14, 14), 2, False), ((7, 5), 0, True), ((4, 6), 3, True)],
)
def test_products_backward_equals_torchvision(
    monkeypatch: pytest.MonkeyPatch,
    output_size: tuple[int, int],
    sampling_ratio: int,
    aligned: bool,
) -> None:
    monkeypatch.setattr(module, "use_products", lambda *args: True)
    scale = 0.25
    features = torch.randn(3, 6, 12, 10)
    rois = _rois(40, images=3, map_size=12, scale=scale, seed=sampling_ratio)
    grad = torch.randn(40, 6, *output_size)

    def ours(x: Tensor, r: Tensor) -> Tensor:
        return roi_align(x, r, output_size, scale, sampling_ratio, aligned)

    def reference(x: Tensor, r: Tensor) -> Tensor:
        return torchvision_roi_align(x, r, output_size, scale, sampling_ratio, aligned)

    out, gradient, node = _feature_gradients(ours, features, rois, grad)
    expected_out, expected, _ = _feature_gradients(reference, features, rois, grad)
    assert node == "_RoIAlignProductsBackwardBackward"
    torch.testing.assert_close(out, expected_out, rtol=0, atol=0)
    assert expected.abs().sum() > 0 and expected[2].abs().sum() == 0  # the last image has no RoI
    torch.testing.assert_close(gradient, expected, rtol=1e-5, atol=1e-5)


def test_products_backward_takes_bfloat16_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(module, "use_products", lambda *args: True)
    features = torch.randn(2, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    rois = _rois(10, images=2, map_size=8, scale=0.5, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = roi_align(features, rois, (7, 7), 0.5, 0)
    out.float().sum().backward()
    assert out.dtype == features.grad.dtype == torch.bfloat16
    expected = torch.ops.torchvision._roi_align_backward(
        torch.ones(10, 4, 7, 7), rois, 0.5, 7, 7, 2, 4, 8, 8, 0, False
    )
    torch.testing.assert_close(features.grad.float(), expected, rtol=1e-2, atol=1e-2)


def test_products_are_chosen_for_small_maps_only() -> None:
    rois = torch.tensor([[0.0, 8.0, 8.0, 40.0, 48.0]] * 4)
    settings = RoIAlignSettings((7, 7), spatial_scale=0.25, sampling_ratio=0)
    assert use_products(rois, (16, 16), settings)  # the shapes recipe's P2
    assert not use_products(rois, (200, 336), settings)  # COCO's P2
    assert not use_products(rois[:0], (16, 16), settings)  # no RoIs


def test_without_gradient_the_call_is_torchvision_s(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> bool:
        raise AssertionError("the gate is asked only when a gradient reaches CPU features")

    monkeypatch.setattr(module, "use_products", refuse)
    rois = _rois(5, images=2, map_size=8, scale=1.0, seed=0)
    out = roi_align(torch.randn(2, 3, 8, 8), rois, 7, 1.0, 2)  # one int: square, as torchvision
    assert out.shape == (5, 3, 7, 7)


def test_multiscale_pooler_matches_torchvision_s(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    original = module._RoIAlignProductsBackward.apply

    def counted(*args: object) -> Tensor:
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(module._RoIAlignProductsBackward, "apply", counted)
    maps = {"0": (16, 16), "1": (8, 8), "2": (4, 4), "3": (2, 2)}
    features = OrderedDict((name, torch.randn(2, 5, *size)) for name, size in maps.items())
    generator = torch.Generator().manual_seed(0)
    corner = torch.rand(2, 30, 2, generator=generator) * 40
    boxes = [torch.cat([c, c + 4 + torch.rand(30, 2, generator=generator) * 60], 1) for c in corner]
    grad = torch.randn(60, 5, 7, 7)
    gradients = []
    for pool_class in (MultiScaleRoIAlignFastBackward, MultiScaleRoIAlign):
        leaves = OrderedDict((name, f.clone().requires_grad_()) for name, f in features.items())
        pooled = pool_class(list(maps), 7, 0)(leaves, boxes, [(64, 64), (64, 64)])
        pooled.backward(grad)
        gradients.append((pooled.detach(), [f.grad for f in leaves.values()]))
    (ours, ours_grads), (expected, expected_grads) = gradients
    assert calls  # some level took the products
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    for got, want in zip(ours_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
