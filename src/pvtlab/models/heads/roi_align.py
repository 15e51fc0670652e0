"""RoIAlign with a CPU backward made of matrix products, for the Mask R-CNN head.

torchvision's CPU `roi_align` backward scatters every bilinear sample of every channel one at a
time on one thread: on the shapes recipe it was a quarter of a Mask R-CNN training step (55 of
~200 ms on 2 cores). RoIAlign's weights are separable: a bin's average over its sample grid is
the product of a row weight and a column weight, each the mean of 1-D linear interpolation
weights. So a RoI's output is ``Ay @ F @ Ax^T`` per channel, with ``Ay`` (bins x H) and ``Ax``
(bins x W), and the gradient of the feature map is ``sum over RoIs of Ay^T @ G @ Ax``: a batched
product and one product per image, which run at the matrix-multiply rate on every core.

Those products cover the whole map, not just the RoI, so they cost ``W * (bins + H)``
multiply-adds per output row against the kernel's ``bins * samples``, and hold a float32
(RoIs x bins x channels x W) buffer (235 MB for 512 RoIs of 7 x 7 bins on a 64 x 64 map of 256
channels); on large maps (COCO's P2 at 800 x 1333) the kernel wins and stays in use
(`use_products`). The forward pass is torchvision's everywhere, and so is the backward on GPUs,
where torchvision's kernel is fast.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops import roi_align as torchvision_roi_align
from torchvision.ops.poolers import _convert_to_roi_format, _filter_input, _setup_scales

__all__ = [
    "MultiScaleRoIAlignFastBackward",
    "RoIAlignSettings",
    "backward_by_products",
    "roi_align",
    "samples_per_bin",
    "use_products",
]

# Multiply-adds of the products that take as long as one bilinear sample (per channel) of
# torchvision's CPU backward. Measured on 2 cores (AMD EPYC, torch 2.14, 2026-12-05, maps of
# 8x8 to 200x336 px, 43-512 RoIs, 7x7 and 14x14 bins): the two broke even between 640 and 1280
# with freed memory reused (`pvtlab.utils.allocator`, the entry points' setting) and between 450
# and 620 under glibc's default; at 450 or less the products ran 1.19-20x faster under either.
# More cores only favour the products: the kernel runs on one thread.
PRODUCTS_PER_SAMPLE = 400.0


@dataclass(frozen=True)
class RoIAlignSettings:
    """One RoIAlign call's parameters, as `torchvision.ops.roi_align` takes them."""

    output_size: tuple[int, int]  # bins, (rows, columns)
    spatial_scale: float = 1.0  # map pixels per image pixel
    sampling_ratio: int = -1  # samples per bin side; <= 0: ceil(RoI side / bins)
    aligned: bool = False  # shift boxes by half a pixel (torchvision's aligned mode)


def _bin_grid(extent: Tensor, bins: int, sampling_ratio: int) -> Tensor:
    """Samples per bin side for each RoI, as torchvision counts them."""
    if sampling_ratio > 0:
        return torch.full_like(extent, float(sampling_ratio))
    return torch.ceil(extent / bins)


def _axis_weights(start: Tensor, extent: Tensor, bins: int, grid: Tensor, size: int) -> Tensor:
    """(RoIs, bins, size): each bin's 1-D interpolation weights along one axis of a map of
    `size` pixels, averaged over the bin's `grid` samples; torchvision's clamping rules."""
    rois = start.shape[0]
    most = max(int(grid.max()), 1) if rois else 1
    bin_size = (extent / bins)[:, None, None]
    bin_index = torch.arange(bins, dtype=start.dtype, device=start.device)[None, :, None]
    sample = torch.arange(most, dtype=start.dtype, device=start.device)[None, None, :]
    grid = grid[:, None, None]
    divisor = grid.clamp(min=1.0)  # an empty grid (aligned RoIs of negative size) samples nothing
    position = start[:, None, None] + bin_index * bin_size + (sample + 0.5) * bin_size / divisor
    # Samples past the RoI's own grid, or more than a pixel outside the map, weigh nothing.
    weight = ((sample < grid) & (position >= -1.0) & (position <= size)) / divisor
    position = position.clamp(min=0.0)
    low = position.floor().long()
    past_last = low >= size - 1
    low = low.clamp(max=size - 1)
    high = torch.where(past_last, low, low + 1)
    fraction = torch.where(past_last, 0.0, position - low)
    weights = position.new_zeros(rois, bins, size)
    weights.scatter_add_(2, low, (1.0 - fraction) * weight)
    weights.scatter_add_(2, high, fraction * weight)
    return weights


def _roi_geometry(
    rois: Tensor, settings: RoIAlignSettings
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Start and extent of every RoI on the map, (y, x) each, as torchvision computes them."""
    offset = 0.5 if settings.aligned else 0.0
    x1, y1, x2, y2 = (rois[:, 1:].float() * settings.spatial_scale - offset).unbind(1)
    height, width = y2 - y1, x2 - x1
    if not settings.aligned:  # torchvision's legacy mode: every RoI at least a pixel wide
        height, width = height.clamp(min=1.0), width.clamp(min=1.0)
    return y1, height, x1, width


def samples_per_bin(rois: Tensor, settings: RoIAlignSettings) -> Tensor:
    """(RoIs,): the bilinear samples averaged in each bin of each RoI, as torchvision counts."""
    _, height, _, width = _roi_geometry(rois, settings)
    (bins_y, bins_x), ratio = settings.output_size, settings.sampling_ratio
    return _bin_grid(height, bins_y, ratio) * _bin_grid(width, bins_x, ratio)


def use_products(rois: Tensor, map_size: tuple[int, int], settings: RoIAlignSettings) -> bool:
    """Whether the products' backward is estimated faster than torchvision's CPU kernel on a
    (rows, columns) `map_size` feature map."""
    if rois.shape[0] == 0:
        return False
    bins_x = settings.output_size[1]
    kernel_samples = bins_x * float(samples_per_bin(rois, settings).mean())
    products = map_size[1] * (bins_x + map_size[0])
    return products <= PRODUCTS_PER_SAMPLE * kernel_samples


def backward_by_products(
    grad: Tensor, rois: Tensor, feature_shape: torch.Size, settings: RoIAlignSettings
) -> Tensor:
    """The gradient of RoIAlign's feature map, in float32: sum over RoIs of Ay^T @ G @ Ax."""
    batch, channels, height, width = feature_shape
    bins_y, bins_x = settings.output_size
    count = rois.shape[0]
    grad = grad.float()
    y1, roi_height, x1, roi_width = _roi_geometry(rois, settings)
    grid_y = _bin_grid(roi_height, bins_y, settings.sampling_ratio)
    grid_x = _bin_grid(roi_width, bins_x, settings.sampling_ratio)
    rows = _axis_weights(y1, roi_height, bins_y, grid_y, height)  # (R, bins_y, H)
    columns = _axis_weights(x1, roi_width, bins_x, grid_x, width)  # (R, bins_x, W)

    # Grouped by image, so that each image's RoIs sum in one product over (RoI, bin); the small
    # tensors are reordered, so that G @ Ax comes out as (RoI, bin_y, channel, column) rows.
    image = rois[:, 0].long()
    order = torch.argsort(image, stable=True)
    grad = grad[order].permute(0, 2, 1, 3).reshape(count, bins_y * channels, bins_x)
    by_columns = torch.bmm(grad, columns[order]).view(count * bins_y, channels * width)
    rows = rows[order].reshape(count * bins_y, height)
    out = grad.new_zeros(batch, height, channels * width)
    first = 0
    for index, rois_of_image in enumerate(torch.bincount(image, minlength=batch).tolist()):
        if rois_of_image:
            span = slice(first * bins_y, (first + rois_of_image) * bins_y)
            torch.mm(rows[span].t(), by_columns[span], out=out[index])
            first += rois_of_image
    return out.view(batch, height, channels, width).permute(0, 2, 1, 3)


class _RoIAlignProductsBackward(torch.autograd.Function):
    """torchvision's RoIAlign forward; the backward by `backward_by_products`."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        features: Tensor,
        rois: Tensor,
        settings: RoIAlignSettings,
    ) -> Tensor:
        ctx.save_for_backward(rois)
        ctx.settings = settings
        ctx.feature_shape, ctx.feature_dtype = features.shape, features.dtype
        return torch.ops.torchvision.roi_align(
            features,
            rois,
            settings.spatial_scale,
            *settings.output_size,
            settings.sampling_ratio,
            settings.aligned,
        )

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: Tensor
    ) -> tuple[Tensor, None, None]:
        (rois,) = ctx.saved_tensors
        grad_features = backward_by_products(grad, rois, ctx.feature_shape, ctx.settings)
        return grad_features.to(ctx.feature_dtype), None, None


def roi_align(
    features: Tensor,
    rois: Tensor,
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
) -> Tensor:
    """`torchvision.ops.roi_align` on (K, 5) `rois` (image index, x1, y1, x2, y2); where the
    gradient reaches CPU features and `use_products` says so, the backward is the products'."""
    bins = (output_size, output_size) if isinstance(output_size, int) else tuple(output_size)
    settings = RoIAlignSettings(bins, spatial_scale, sampling_ratio, aligned)
    if (
        features.requires_grad
        and torch.is_grad_enabled()
        and features.device.type == "cpu"
        and use_products(rois, features.shape[-2:], settings)
    ):
        return _RoIAlignProductsBackward.apply(features, rois, settings)
    return torchvision_roi_align(
        features, rois, output_size, spatial_scale, sampling_ratio, aligned
    )


class MultiScaleRoIAlignFastBackward(MultiScaleRoIAlign):
    """torchvision's `MultiScaleRoIAlign` (same levels, scales and outputs) pooling each level
    with pvtlab's `roi_align`."""

    def forward(
        self, x: dict[str, Tensor], boxes: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> Tensor:
        features = _filter_input(x, self.featmap_names)
        if self.scales is None or self.map_levels is None:
            self.scales, self.map_levels = _setup_scales(
                features, image_shapes, self.canonical_scale, self.canonical_level
            )
        rois = _convert_to_roi_format(boxes)
        output_size = tuple(self.output_size)
        if len(features) == 1:
            return roi_align(features[0], rois, output_size, self.scales[0], self.sampling_ratio)
        levels = self.map_levels(boxes)
        pooled = features[0].new_zeros((rois.shape[0], features[0].shape[1], *output_size))
        for level, (level_features, scale) in enumerate(zip(features, self.scales, strict=True)):
            in_level = torch.where(levels == level)[0]
            level_pooled = roi_align(
                level_features, rois[in_level], output_size, scale, self.sampling_ratio
            )
            # Under autocast the levels' dtypes can differ from the first level's.
            pooled[in_level] = level_pooled.to(pooled.dtype)
        return pooled
