"""RoIAlign's CPU backward: torchvision's kernel against pvtlab's matrix products
(`pvtlab.models.heads.roi_align`), at the Mask R-CNN poolers' shapes; the detectors suite
reports it, with the path `use_products` takes at each shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from pvtlab.bench import markdown_table, time_interleaved
from pvtlab.models.heads.roi_align import (
    RoIAlignSettings,
    backward_by_products,
    samples_per_bin,
    use_products,
)

__all__ = ["RoIAlignCase", "RoIAlignRow", "roi_align_backward_times", "roi_align_section"]


class RoIAlignCase(NamedTuple):
    """One pooler call: a feature map, its RoIs, the output bins, and what it stands for."""

    name: str
    batch: int
    channels: int
    height: int
    width: int
    rois: int
    stride: int  # image pixels per map pixel
    largest_roi: int  # RoI sides drawn up to this many image pixels
    bins: int


class RoIAlignRow(NamedTuple):
    case: RoIAlignCase
    samples_per_bin: float
    torchvision_ms: float
    products_ms: float
    products_taken: bool


CASES = (
    RoIAlignCase("shapes recipe, box pooler (P2)", 4, 64, 16, 16, 256, 4, 40, 7),
    RoIAlignCase("shapes recipe, mask pooler (P2)", 4, 64, 16, 16, 48, 4, 40, 14),
    RoIAlignCase("256 px images, box pooler (P2)", 2, 256, 64, 64, 512, 4, 100, 7),
    RoIAlignCase("COCO 800x1333, box pooler (P4)", 2, 256, 50, 84, 128, 16, 400, 7),
    RoIAlignCase("COCO 800x1333, box pooler (P2)", 2, 256, 200, 336, 512, 4, 100, 7),
)
QUICK_CASES = (
    RoIAlignCase("small map", 2, 8, 16, 16, 32, 4, 40, 7),
    RoIAlignCase("large map", 1, 8, 128, 128, 8, 4, 60, 7),
)
SAMPLING_RATIO = 0  # adaptive, as pvtlab's Mask R-CNN pools


def _rois(case: RoIAlignCase) -> torch.Tensor:
    """(rois, 5) boxes at random places inside the images, sorted by image as torchvision's
    poolers pass them."""
    generator = torch.Generator().manual_seed(0)
    image = torch.tensor([case.width, case.height]) * case.stride
    corner = torch.rand(case.rois, 2, generator=generator) * image
    size = 4 + torch.rand(case.rois, 2, generator=generator) * case.largest_roi
    index = torch.randint(0, case.batch, (case.rois, 1), generator=generator).sort(0).values
    return torch.cat([index.float(), corner, torch.minimum(corner + size, image)], dim=1)


def _row(case: RoIAlignCase, repeats: int) -> RoIAlignRow:
    rois = _rois(case)
    grad = torch.randn(case.rois, case.channels, case.bins, case.bins)
    settings = RoIAlignSettings((case.bins, case.bins), 1.0 / case.stride, SAMPLING_RATIO)
    shape = torch.Size((case.batch, case.channels, case.height, case.width))
    paths = {
        "torchvision": lambda: torch.ops.torchvision._roi_align_backward(
            grad, rois, settings.spatial_scale, *settings.output_size, *shape,
            settings.sampling_ratio, settings.aligned,
        ),
        "products": lambda: backward_by_products(grad, rois, shape, settings),
    }  # fmt: skip
    seconds = time_interleaved(paths, warmup=1, repeats=repeats)
    samples = float(samples_per_bin(rois, settings).mean())
    taken = use_products(rois, shape[-2:], settings)
    return RoIAlignRow(
        case, samples, 1e3 * seconds["torchvision"], 1e3 * seconds["products"], taken
    )


def roi_align_backward_times(quick: bool) -> list[RoIAlignRow]:
    """Both backward paths of each case (quick: two tiny ones), timed in turns on the CPU."""
    return [_row(case, 1 if quick else 5) for case in (QUICK_CASES if quick else CASES)]


def roi_align_section(rows: Sequence[RoIAlignRow]) -> str:
    """The report's table of `roi_align_backward_times`."""
    return (
        "## RoIAlign backward on the CPU (Mask R-CNN's poolers)\n\n"
        "The feature map's gradient of one RoIAlign call: torchvision's CPU kernel (one thread, "
        "a scattered add per sample and channel) against pvtlab's two matrix products "
        "(`pvtlab.models.heads.roi_align`: RoIAlign's bilinear weights are separable, so the "
        "gradient is the sum over RoIs of Ay^T G Ax), ms, median of runs taken in turns; "
        f"{torch.get_num_threads()} threads; adaptive sampling. `taken`: the path pvtlab's "
        "pooler takes there (`use_products`). Random RoIs of 4 px up to the named size.\n\n"
        + markdown_table(
            [
                "case",
                "batch x channels x map",
                "RoIs",
                "bins",
                "samples per bin",
                "torchvision ms",
                "products ms",
                "speed-up",
                "taken",
            ],
            [
                (
                    r.case.name,
                    f"{r.case.batch} x {r.case.channels} x {r.case.height}x{r.case.width}",
                    r.case.rois,
                    f"{r.case.bins}x{r.case.bins}",
                    r.samples_per_bin,
                    r.torchvision_ms,
                    r.products_ms,
                    r.torchvision_ms / r.products_ms,
                    "products" if r.products_taken else "torchvision",
                )
                for r in rows
            ],
        )
    )
