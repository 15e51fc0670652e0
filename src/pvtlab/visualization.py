"""Pictures of a model's predictions: one tile per image, then a captioned grid as a PNG.

Each task's `predict_for_display(batch, limit)` returns plain tensors of one kind (see the
`draw_*` functions); :func:`draw_tiles` turns them into uint8 `(3, H, W)` tiles with captions:

- classification: the image, captioned with the true class and the top-5 with probabilities;
- detection: predicted boxes (class and score) beside the ground-truth boxes;
- segmentation: the image, the predicted label map and the true one, as coloured overlays.

The same tiles go to W&B (`wandb.Image` with captions) and to :func:`save_grid` (matplotlib),
so users without an account see the same pictures in the run folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

__all__ = [
    "PALETTE",
    "Tile",
    "class_colors",
    "class_names_of",
    "draw_classification",
    "draw_detection",
    "draw_detections",
    "draw_segmentation",
    "draw_tiles",
    "overlay_label_map",
    "save_grid",
    "to_display",
]

Tile = tuple[Tensor, str]  # uint8 (3, H, W) picture and its caption

# Distinct colours (tab20 order) for classes; cycled past 20.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
    (174, 199, 232), (255, 187, 120), (152, 223, 138), (255, 152, 150), (197, 176, 213),
    (196, 156, 148), (247, 182, 210), (199, 199, 199), (219, 219, 141), (158, 218, 229),
)  # fmt: skip
GAP = 4  # pixels between the panels of one tile
MIN_SIDE = 192  # small images are enlarged (nearest) so that labels stay legible


def to_display(image: Tensor) -> Tensor:
    """A normalized float image `(3, H, W)` as uint8, each channel stretched to [0, 255].

    Data pipelines normalize with different means and scales; stretching per channel needs none
    of them and keeps the colours close to the original.
    """
    if image.dtype == torch.uint8:
        return image.cpu()
    image = image.detach().float().cpu()
    low = image.amin(dim=(1, 2), keepdim=True)
    high = image.amax(dim=(1, 2), keepdim=True)
    return ((image - low) / (high - low).clamp(min=1e-6) * 255).round().to(torch.uint8)


def _enlarge(image: Tensor) -> tuple[Tensor, int]:
    """Integer nearest-neighbour upscaling of a uint8 image to at least MIN_SIDE on its short side."""
    factor = max(1, math.ceil(MIN_SIDE / max(1, min(image.shape[-2:]))))
    if factor == 1:
        return image, 1
    return image.repeat_interleave(factor, dim=-2).repeat_interleave(factor, dim=-1), factor


def _side_by_side(panels: Sequence[Tensor]) -> Tensor:
    height = max(p.shape[-2] for p in panels)
    padded = [F.pad(p, (0, GAP, 0, height - p.shape[-2]), value=255) for p in panels]
    return torch.cat(padded, dim=-1)[..., :-GAP]


def _name(names: Sequence[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else f"class_{index}"


def _colors(labels: Tensor) -> list[tuple[int, int, int]]:
    return [PALETTE[int(i) % len(PALETTE)] for i in labels.tolist()]


def draw_classification(
    images: Tensor, targets: Tensor, scores: Tensor, names: Sequence[str], top_k: int = 5
) -> list[Tile]:
    """Tiles of `images` `(N, 3, H, W)` captioned with the true class and the top-k classes.

    `scores` are `(N, K)` class probabilities, `targets` `(N,)` class indices.
    """
    k = min(top_k, scores.shape[1])
    probs, classes = scores.float().cpu().topk(k, dim=1)
    tiles = []
    for image, target, p, c in zip(images, targets.tolist(), probs, classes, strict=True):
        mark = "ok" if int(c[0]) == target else "wrong"
        lines = [f"true: {_name(names, target)} ({mark})"]
        lines += [f"{_name(names, i)} {v:.2f}" for v, i in zip(p.tolist(), c.tolist(), strict=True)]
        tiles.append((_enlarge(to_display(image))[0], "\n".join(lines)))
    return tiles


def draw_detection(
    images: Sequence[Tensor],
    targets: Sequence[Mapping[str, Tensor]],
    predictions: Sequence[Mapping[str, Tensor]],
    names: Sequence[str],
    min_score: float = 0.3,
    max_boxes: int = 10,
) -> list[Tile]:
    """Per image: predicted boxes with class and score (left) beside the ground truth (right).

    Boxes are xyxy in the pixels of `images`, labels 0-based. Predictions scoring below
    `min_score` are hidden, except that the best three are always drawn (an early model's
    scores are all low, and an empty picture says nothing).
    """
    tiles = []
    for image, target, pred in zip(images, targets, predictions, strict=True):
        picture, factor = _enlarge(to_display(image))
        scores = pred["scores"].float().cpu()
        order = scores.argsort(descending=True)[:max_boxes]
        keep = order[(scores[order] >= min_score) | (torch.arange(len(order)) < 3)]
        boxes, labels = pred["boxes"].float().cpu()[keep] * factor, pred["labels"].cpu()[keep]
        captions = [
            f"{_name(names, int(c))} {s:.2f}"
            for c, s in zip(labels.tolist(), scores[keep].tolist(), strict=True)
        ]
        predicted = draw_bounding_boxes(picture, boxes, captions, colors=_colors(labels), width=2)
        true_labels = target["labels"].cpu()
        truth = draw_bounding_boxes(
            picture,
            target["boxes"].float().cpu() * factor,
            [_name(names, int(c)) for c in true_labels.tolist()],
            colors=_colors(true_labels),
            width=2,
        )
        caption = (
            f"prediction ({len(keep)} of {len(scores)} boxes) | ground truth ({len(true_labels)})"
        )
        tiles.append((_side_by_side([predicted, truth]), caption))
    return tiles


def _overlay(picture: Tensor, label_map: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    classes = torch.arange(num_classes)
    masks = label_map[None] == classes[:, None, None]
    masks &= (label_map != ignore_index)[None]
    return draw_segmentation_masks(picture, masks, alpha=0.6, colors=list(PALETTE[:num_classes]))


def draw_segmentation(
    images: Sequence[Tensor],
    labels: Sequence[Tensor],
    predictions: Sequence[Tensor],
    names: Sequence[str],
    ignore_index: int = 255,
) -> list[Tile]:
    """Per image: the image, the predicted label map and the true one, as coloured overlays.

    Images `(3, H, W)` and label maps `(H, W)` of one sample share their size. Predictions are
    drawn on the labelled pixels only: unlabelled ones (`ignore_index`, e.g. ADE20K's "other")
    are not scored, so a colour there would mean nothing.
    """
    num_classes = max(len(names), min(len(PALETTE), 1 + max(int(p.max()) for p in predictions)))
    num_classes = min(num_classes, len(PALETTE))
    tiles = []
    for image, label, pred in zip(images, labels, predictions, strict=True):
        label, pred = label.cpu().long(), pred.cpu().long()
        picture, factor = _enlarge(to_display(image))
        if factor > 1:
            label = label.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
            pred = pred.repeat_interleave(factor, 0).repeat_interleave(factor, 1)
        pred = torch.where(label == ignore_index, ignore_index, pred)
        predicted = _overlay(picture, pred, num_classes, ignore_index)
        truth = _overlay(picture, label, num_classes, ignore_index)
        scored = label != ignore_index
        accuracy = (pred[scored] == label[scored]).float().mean().item() if scored.any() else 0.0
        present = sorted(set(label[scored].unique().tolist()))
        caption = (
            f"image | prediction | truth (pixel acc {accuracy:.2f})\n"
            f"true: {', '.join(_name(names, i) for i in present) or '-'}"
        )
        tiles.append((_side_by_side([picture, predicted, truth]), caption))
    return tiles


def draw_tiles(outputs: Mapping[str, Any], names: Sequence[str]) -> list[Tile]:
    """Tiles of one `predict_for_display` result, dispatched on its `kind`."""
    kind = outputs.get("kind")
    if kind == "classification":
        return draw_classification(outputs["images"], outputs["targets"], outputs["scores"], names)
    if kind == "detection":
        return draw_detection(outputs["images"], outputs["targets"], outputs["predictions"], names)
    if kind == "segmentation":
        return draw_segmentation(
            outputs["images"],
            outputs["labels"],
            outputs["predictions"],
            names,
            outputs.get("ignore_index", 255),
        )
    raise ValueError(
        f"predict_for_display returned kind={kind!r}; expected classification, detection or "
        "segmentation"
    )


def save_grid(tiles: Sequence[Tile], path: str | Path, title: str = "", columns: int = 0) -> Path:
    """Write the tiles as one captioned grid (PNG). `columns` 0: 4 for square tiles, else 2."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    if not tiles:
        raise ValueError(f"save_grid({path}): no tiles to draw")
    height, width = tiles[0][0].shape[-2:]
    columns = columns or (4 if width <= 1.5 * height else 2)
    columns = min(columns, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    lines = max(c.count("\n") + 1 for _, c in tiles)
    tile_w = 2.6 * width / max(width, height) * (1.6 if width > 1.5 * height else 1.0)
    tile_h = tile_w * height / width + 0.16 * lines
    figure = Figure(figsize=(columns * tile_w, rows * tile_h + (0.4 if title else 0)))
    axes = figure.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (picture, caption) in zip(axes.flat, tiles, strict=False):
        ax.imshow(picture.permute(1, 2, 0).numpy())
        ax.set_title(caption, fontsize=7, loc="left", family="monospace")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path


def class_names_of(
    datamodule: Any, num_classes: int, datasets: Sequence[Any] = ()
) -> tuple[str, ...]:
    """Class names from a data module (`class_names`, `classes`) or a COCO dataset's categories."""
    for attribute in ("class_names", "classes"):
        names = tuple(getattr(datamodule, attribute, None) or ())
        if len(names) == num_classes:
            return tuple(str(n) for n in names)
    for dataset in datasets:
        coco = getattr(dataset, "coco", None)
        if coco is not None:
            cats = sorted(coco.dataset.get("categories", []), key=lambda c: c["id"])
            if len(cats) == num_classes:
                return tuple(str(c["name"]) for c in cats)
    return tuple(f"class_{i}" for i in range(num_classes))


def class_colors(num_classes: int) -> list[tuple[int, int, int]]:
    """The colour of each class, `PALETTE` cycled."""
    return [PALETTE[i % len(PALETTE)] for i in range(num_classes)]


def draw_detections(
    image: Tensor,
    prediction: Mapping[str, Tensor],
    names: Sequence[str],
    min_score: float = 0.3,
) -> Tensor:
    """One picture's detections drawn on it (uint8 `(3, H, W)`): masks when predicted, boxes
    captioned with class and score, those scoring below `min_score` left out.

    `prediction` holds `boxes` (xyxy, the picture's pixels), `scores`, 0-based `labels` and
    optionally `masks` ((N, H, W) booleans at the picture's size)."""
    keep = prediction["scores"].float().cpu() >= min_score
    labels = prediction["labels"].cpu()[keep]
    colors = _colors(labels)
    picture = image.cpu()
    masks = prediction.get("masks")
    if masks is not None and int(keep.sum()):
        picture = draw_segmentation_masks(picture, masks.cpu()[keep].bool(), 0.4, colors)
    captions = [
        f"{_name(names, int(c))} {s:.2f}"
        for c, s in zip(labels.tolist(), prediction["scores"].cpu()[keep].tolist(), strict=True)
    ]
    boxes = prediction["boxes"].float().cpu()[keep]
    return draw_bounding_boxes(picture, boxes, captions, colors=colors, width=2)


def overlay_label_map(
    image: Tensor, label_map: Tensor, num_classes: int, alpha: float = 0.5
) -> Tensor:
    """A label map `(H, W)` of class indices laid over its picture (uint8 `(3, H, W)`) in the
    class colours."""
    label_map = label_map.cpu().long()
    present = label_map.unique().tolist()
    classes = torch.tensor([c for c in present if 0 <= c < num_classes], dtype=torch.long)
    if not len(classes):
        return image.cpu()
    masks = label_map[None] == classes[:, None, None]
    colors = [PALETTE[int(c) % len(PALETTE)] for c in classes.tolist()]
    return draw_segmentation_masks(image.cpu(), masks, alpha=alpha, colors=colors)
