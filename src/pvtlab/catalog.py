"""Every backbone and head of ``conf/``, with its parameters and compute (``python src/models.py``).

Each entry is built as a run builds it, from its config group composed with Hydra, on the data
set the paper measures it on and at that data set's evaluation input size (``data.transforms``):

* a backbone as an ImageNet classifier (1000 classes) at 224 x 224, the paper's Table 2;
* a head on PVT-Small: the detectors on COCO (80 classes) at 800 x 1333, the segmenters on
  ADE20K (150 classes) at 512 x 512, the classifier on ImageNet at 224 x 224.

``data=`` lists every model on one data choice instead (``shapes``: the quickstart's sizes).

GMACs are those of one forward pass in evaluation mode, attention products included
(:mod:`pvtlab.models.complexity`), the figure the console summary at the start of a run shows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pvtlab.config import head_kind
from pvtlab.loggers import complexity_input_size, network_gmacs
from pvtlab.models.factory import backbone_family
from pvtlab.pipeline import build_model

__all__ = ["ModelEntry", "list_models", "markdown_table", "text_table"]

# The data set each kind of model is listed on (the paper's), and the backbone heads are shown on.
REFERENCE_DATA = {"classification": "imagenet", "detection": "coco", "segmentation": "ade20k"}
HEAD_BACKBONE = "pvt_small"
# The paper's data sets count their classes on disk (class folders, annotation json, class list),
# which a listing does not read: ImageNet-1k's, COCO 2017's and ADE20K's counts.
REFERENCE_CLASSES = {"imagenet": 1000, "coco": 80, "ade20k": 150}

_BACKBONE_WEIGHTS = {
    "pvt": "release pvt_*.pth; pvtlab .pth / .safetensors / .ckpt; transformers PVT folder; "
    "timm folder",
    "cnn": "timm state dict (.pth / .safetensors); pvtlab .ckpt",
    "vit": "timm ViT state dict (.pth / .safetensors); pvtlab .ckpt",
}
_HEAD_WEIGHTS = {
    "linear": "pvtlab .ckpt; the backbone's layouts (backbone.pretrained=)",
    "retinanet": "pvtlab .ckpt; PVT release's mmdetection checkpoint",
    "mask_rcnn": "pvtlab .ckpt; PVT release's mmdetection checkpoint",
    "semantic_fpn": "pvtlab .ckpt; PVT release's mmsegmentation checkpoint",
}


@dataclass(frozen=True)
class ModelEntry:
    """One row of the listing."""

    group: str  # "backbone" or "head"
    name: str  # the config choice
    selected_by: str  # the command-line choices that select it
    measured_as: str  # the network counted
    params: int
    gmacs: float
    input_size: tuple[int, int]
    weights: str  # the weight layouts it accepts


def _compose(conf_dir: Path, overrides: Sequence[str]) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(conf_dir.resolve()), version_base="1.3"):
        cfg = compose("train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # `${hydra:...}` values resolve as in a run
    return cfg


def _choices(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


def _measure(cfg: DictConfig, kind: str, data: str) -> tuple[int, float, tuple[int, int]]:
    size = complexity_input_size(cfg.data.transforms)
    if size is None:
        raise ValueError(f"data={data} names no evaluation input size")
    num_classes = int(cfg.data.num_classes or REFERENCE_CLASSES[data])
    try:  # shapes only, no arithmetic: counting needs none
        with torch.device("meta"):
            model = build_model(cfg.backbone, cfg.head, num_classes).eval()
        gmacs = network_gmacs(model, kind, size)
    except Exception:  # a detector's post-processing has data-dependent shapes: real tensors
        model = build_model(cfg.backbone, cfg.head, num_classes).eval()
        with torch.no_grad():
            gmacs = network_gmacs(model, kind, size)
    return sum(p.numel() for p in model.parameters()), gmacs, size


def _head_name(target: str) -> str:
    return target.rpartition(".")[0].rpartition(".")[2]


def list_models(
    conf_dir: str | PathLike[str],
    backbones: Iterable[str] | None = None,
    heads: Iterable[str] | None = None,
    *,
    data: str | None = None,
    head_backbone: str = HEAD_BACKBONE,
) -> list[ModelEntry]:
    """The backbones and heads of `conf_dir` (all of them unless named), measured as the module
    docstring says.

    Args:
        data: list every model on this data choice (e.g. ``shapes``, at its own input sizes and
            classes) instead of the paper's data set for its kind.
        head_backbone: the backbone choice the heads are built on.
    """
    conf_dir = Path(conf_dir)
    entries = []
    for name in backbones if backbones is not None else _choices(conf_dir, "backbone"):
        choice = f"backbone={name}"
        data_choice = data or REFERENCE_DATA["classification"]
        cfg = _compose(conf_dir, [choice, "task=classification", f"data={data_choice}"])
        params, gmacs, size = _measure(cfg, "classification", data_choice)
        family = backbone_family(str(cfg.backbone.name))
        entries.append(
            ModelEntry(
                "backbone",
                name,
                choice,
                f"classifier, data={data_choice}",
                params,
                gmacs,
                size,
                _BACKBONE_WEIGHTS[family],
            )
        )
    for name in heads if heads is not None else _choices(conf_dir, "head"):
        kind = head_kind(_compose(conf_dir, [f"head={name}"]).head)
        if kind is None:
            raise ValueError(f"head={name} is not a pvtlab head")
        data_choice = data or REFERENCE_DATA[kind]
        overrides = [f"task={kind}", f"head={name}"]
        cfg = _compose(conf_dir, [*overrides, f"data={data_choice}", f"backbone={head_backbone}"])
        params, gmacs, size = _measure(cfg, kind, data_choice)
        selected = " ".join(overrides) if kind != "classification" else "task=classification"
        weights = _HEAD_WEIGHTS.get(_head_name(str(cfg.head._target_)), "pvtlab .ckpt")
        entries.append(
            ModelEntry(
                "head",
                name,
                selected,
                f"on {head_backbone}, data={data_choice}",
                params,
                gmacs,
                size,
                weights,
            )
        )
    return entries


MARKDOWN_INTRO = (
    "Written by `python src/models.py --markdown`; `make models` prints the same table.",
    "Each model is built as a run builds it from its config choice, on the paper's data set at",
    "its evaluation input size: backbones as ImageNet classifiers (1000 classes) at 224 x 224,",
    f"heads on {HEAD_BACKBONE} (COCO's 80 classes at 800 x 1333, ADE20K's 150 at 512 x 512).",
    "GMACs: one forward pass in evaluation mode, attention products included, as the paper",
    "counts them; the run-start summary shows the same figures for a run's own network.",
)
_COLUMNS = ("model", "selected by", "counted as", "params (M)", "GMACs", "input", "weights")


def _cells(entry: ModelEntry) -> tuple[str, ...]:
    return (
        entry.name,
        entry.selected_by,
        entry.measured_as,
        f"{entry.params / 1e6:.2f}",
        f"{entry.gmacs:.2f}",
        f"{entry.input_size[0]}x{entry.input_size[1]}",
        entry.weights,
    )


def text_table(entries: Sequence[ModelEntry]) -> str:
    """The listing as aligned plain text."""
    rows = [_COLUMNS, *(_cells(e) for e in entries)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
    lines = []
    for row in rows:
        head = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False))
        lines.append(f"{head}  {row[-1]}")
    return "\n".join(lines)


def markdown_table(entries: Sequence[ModelEntry]) -> str:
    """The listing as a Markdown document (what ``--markdown`` writes to docs/models.md)."""
    lines = ["# Models", "", *MARKDOWN_INTRO]
    for group in ("backbone", "head"):
        lines += ["", f"## {group.capitalize()}s", ""]
        lines.append("| " + " | ".join(_COLUMNS) + " |")
        lines.append("|" + "---|" * len(_COLUMNS))
        for entry in entries:
            if entry.group == group:
                cells = list(_cells(entry))
                cells[1] = f"`{cells[1]}`"
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
