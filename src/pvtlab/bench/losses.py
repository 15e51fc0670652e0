"""RetinaNet's training loss alone, pvtlab's device-side version against torchvision's.

torchvision's `RetinaNet.compute_loss` assigns anchors and sums its losses image by image and
reads values back from the device up to 11 times an image; pvtlab's
(`pvtlab.models.heads.retinanet_loss`, used by `DeviceLossRetinaNet`) runs over the whole
batch with masks and reads nothing back. Both give the same numbers
(tests/models/test_retinanet_loss.py). Here each takes random head outputs at a detection
input, forward and backward, in turns; the report also gives each one's loss values, which
should agree, and how many times each makes the host wait (`pvtlab.utils.host_sync`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.image_list import ImageList

from pvtlab.bench import bench_device, markdown_table, time_interleaved
from pvtlab.models.heads.retinanet import DeviceLossRetinaNet, build_retinanet
from pvtlab.utils.host_sync import DeviceWaits

__all__ = [
    "COCO_LOSS",
    "QUICK_LOSS",
    "RETINANET_LOSSES",
    "LossSetting",
    "LossTiming",
    "retinanet_loss_paths",
    "retinanet_loss_section",
]

RETINANET_LOSSES: dict[str, Callable[..., dict[str, Tensor]]] = {
    "torchvision (RetinaNet.compute_loss)": RetinaNet.compute_loss,
    "pvtlab, on the device (DeviceLossRetinaNet.compute_loss)": DeviceLossRetinaNet.compute_loss,
}
# RetinaNet's pyramid levels P3-P7: the feature strides its anchors are laid on.
STRIDES = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class LossSetting:
    """The input the loss is computed for: image size, batch, classes and boxes an image."""

    height: int
    width: int
    batch: int
    num_classes: int
    boxes_per_image: int


# COCO's training scale (shorter side 800, a 3:2 image padded to 32) with the paper's two
# images a GPU; the shapes-sized setting for tests.
COCO_LOSS = LossSetting(800, 1216, 2, 80, 12)
QUICK_LOSS = LossSetting(96, 128, 2, 3, 3)


@dataclass
class LossTiming:
    """Per loss: median seconds of one forward + backward, its values, and how many operator
    calls in one forward + backward would make the host wait for a GPU."""

    seconds: dict[str, float]
    losses: dict[str, dict[str, float]]
    host_waits: dict[str, int]
    num_anchors: int


def _random_targets(setting: LossSetting, device: torch.device) -> list[dict[str, Tensor]]:
    """`boxes_per_image` boxes an image, 16 px to half the image a side, inside the image."""
    targets = []
    for _ in range(setting.batch):
        n = setting.boxes_per_image
        size = torch.rand(n, 2) * (torch.tensor([setting.width, setting.height]) / 2 - 16) + 16
        corner = torch.rand(n, 2) * (torch.tensor([setting.width, setting.height]) - size)
        boxes = torch.cat([corner, corner + size], dim=1)
        labels = torch.randint(0, setting.num_classes, (n,))
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return targets


def _anchors(model: RetinaNet, setting: LossSetting, device: torch.device) -> list[Tensor]:
    """The model's anchors for a batch of `setting`'s images (its generator reads only the
    shapes of the images and of the P3-P7 feature maps)."""
    images = torch.empty(setting.batch, 3, setting.height, setting.width, device=device)
    image_list = ImageList(images, [(setting.height, setting.width)] * setting.batch)
    features = [
        torch.empty(
            setting.batch, 1, math.ceil(setting.height / s), math.ceil(setting.width / s),
            device=device,
        )
        for s in STRIDES
    ]  # fmt: skip
    return model.anchor_generator(image_list, features)


def retinanet_loss_paths(
    setting: LossSetting, repeats: int, device: torch.device | None = None
) -> LossTiming:
    """Time each of `RETINANET_LOSSES`, forward and backward to random head outputs, in turns
    (median of `repeats` after one warm-up each); before that, one untimed call of each gives
    its loss values and counts its host waits (`DeviceWaits`)."""
    from pvtlab.models import create_backbone

    device = device or bench_device()
    torch.manual_seed(0)
    backbone = create_backbone("pvt_tiny", features_only=True)
    model = build_retinanet(backbone, num_classes=setting.num_classes).to(device).train()
    anchors = _anchors(model, setting, device)
    num_anchors = anchors[0].shape[0]
    shape = (setting.batch, num_anchors)
    # Logits near the head's initial prior (about 0.01 foreground probability), small deltas.
    outputs = {
        "cls_logits": torch.randn(*shape, setting.num_classes, device=device) - 4.6,
        "bbox_regression": 0.1 * torch.randn(*shape, 4, device=device),
    }
    for tensor in outputs.values():
        tensor.requires_grad_()
    targets = _random_targets(setting, device)

    def forward_backward(loss: Callable[..., dict[str, Tensor]]) -> dict[str, Tensor]:
        values = loss(model, targets, outputs, anchors)
        torch.autograd.grad(sum(values.values()), list(outputs.values()))
        return values

    losses, host_waits = {}, {}
    for label, loss in RETINANET_LOSSES.items():  # untimed: counting slows every operator
        with DeviceWaits() as waits:
            values = forward_backward(loss)
        losses[label] = {k: float(v.detach()) for k, v in values.items()}
        host_waits[label] = waits.total
    seconds = time_interleaved(
        {
            label: lambda loss=loss: forward_backward(loss)
            for label, loss in RETINANET_LOSSES.items()
        },
        repeats=repeats,
        device=device,
    )
    return LossTiming(seconds, losses, host_waits, num_anchors)


def retinanet_loss_section(setting: LossSetting, timing: LossTiming, repeats: int) -> str:
    """The report's section: each loss's time, its speed against torchvision's, its host
    waits and its values."""
    reference = timing.seconds[next(iter(RETINANET_LOSSES))]
    rows: list[tuple[Any, ...]] = [
        (
            label,
            1000 * seconds,
            reference / seconds,
            timing.host_waits[label],
            timing.losses[label]["classification"],
            timing.losses[label]["bbox_regression"],
        )
        for label, seconds in timing.seconds.items()
    ]
    return (
        "## RetinaNet's training loss alone (forward + backward)\n\n"
        f"Random head outputs over {timing.num_anchors} anchors (P3-P7 of a "
        f"{setting.height}x{setting.width} input, 9 a position), {setting.num_classes} classes, "
        f"batch {setting.batch}, {setting.boxes_per_image} random boxes an image; median of "
        f"{repeats} in turns after one (`pvtlab.bench.losses`). torchvision's loss works image "
        "by image and reads values back from the device; pvtlab's "
        "(`pvtlab.models.heads.retinanet_loss`, what `head=retinanet` trains with) takes the "
        "whole batch at once with masks and reads nothing back. Host waits: the operator "
        "calls in one forward + backward that would make the host wait for a GPU (a value read "
        "back, or an output whose size depends on the values; `pvtlab.utils.host_sync`). The "
        "loss values should agree.\n\n"
        + markdown_table(
            [
                "loss",
                "ms",
                "speed-up vs torchvision",
                "host waits",
                "classification loss",
                "box loss",
            ],
            rows,
        )
    )
