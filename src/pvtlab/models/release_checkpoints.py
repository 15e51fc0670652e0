"""The PVT release's whole-model checkpoints as pvtlab networks.

The release published RetinaNet and Mask R-CNN checkpoints (mmdetection 2.x) and Semantic FPN
checkpoints (mmsegmentation 0.x) for PVT-Tiny, -Small, -Medium and -Large. mmcv writes them as
``{"meta": {...}, "state_dict": {...}}`` (an ``optimizer`` entry too, unless published without
it); ``meta`` holds plain values (versions, the config text, class names), so the files are read
with ``torch.load(weights_only=True)`` and only ``state_dict`` is used.

Every tensor of the file goes to exactly one tensor of the pvtlab network, and every tensor of the
network is filled; anything else is one :class:`~pvtlab.models.checkpoint.CheckpointError`
listing each file key without a counterpart, each network key left unfilled and each shape that
does not fit. The correspondence, the file's names first:

* ``backbone.*``: the release's dense PVT is its classification layout without the class token,
  final norm and head, which is what pvtlab's PVT feature extractor holds: the names carry over
  unchanged. Position embeddings are resized to the network's grids as for ``backbone.pretrained``.
* ``neck.lateral_convs.{i}.conv`` and ``neck.fpn_convs.{i}.conv`` (mmcv ``ConvModule``, no norm,
  no activation) are torchvision's FPN ``inner_blocks.{i}.0`` and ``layer_blocks.{i}.0``;
  RetinaNet's two extra stride-2 convolutions ``fpn_convs.3`` and ``fpn_convs.4`` are
  ``extra_blocks.p6`` and ``extra_blocks.p7``.
* RetinaNet's ``bbox_head``: ``cls_convs.{i}.conv`` and ``reg_convs.{i}.conv`` are the towers
  ``classification_head.conv.{i}.0`` and ``regression_head.conv.{i}.0``; ``retina_cls`` is
  ``cls_logits`` and ``retina_reg`` is ``bbox_reg``, channel for channel: both libraries lay the
  output channels out anchor-major (anchor * classes + class, anchor * 4 + coordinate), and both
  number a location's anchors ratio-major, scale-minor (mmdetection's ``scale_major=True``,
  torchvision's ``AnchorGenerator``).
* Mask R-CNN's ``rpn_head.rpn_conv``, ``rpn_cls`` and ``rpn_reg`` are ``rpn.head.conv.0.0``,
  ``cls_logits`` and ``bbox_pred``.
* ``roi_head.bbox_head.shared_fcs.0`` and ``.1`` are ``roi_heads.box_head.fc6`` and ``fc7``.
  ``fc_cls`` scores K classes then background (mmdetection's label K); torchvision's
  ``cls_score`` scores background first: the last row moves to the front. ``fc_reg`` regresses
  K class-specific boxes; torchvision's ``bbox_pred`` has K + 1, background's first: four zero
  rows go in front. torchvision drops the background's boxes before NMS and trains only the
  ground-truth class's rows, so those rows never reach a prediction or a loss.
* ``roi_head.mask_head.convs.{i}.conv`` are ``roi_heads.mask_head.{i}.0``; ``upsample`` (the 2x
  deconvolution) is ``mask_predictor.conv5_mask``; ``conv_logits`` (K maps) is
  ``mask_fcn_logits`` (K + 1 maps): a zero background map goes in front, and torchvision reads
  only the map of each detection's class.
* Semantic FPN's ``decode_head.scale_heads.{i}.{j}.conv`` and ``.bn`` (a ``ConvModule`` with
  SyncBN) are ``head.branches.{i}.{j}.0`` and ``.1``; ``decode_head.conv_seg`` is
  ``head.classifier``.

Box deltas: mmdetection's ``DeltaXYWHBBoxCoder`` multiplies them by ``target_stds``, torchvision's
``BoxCoder`` divides them by ``weights``. The release's RoI head uses stds (0.1, 0.1, 0.2, 0.2),
torchvision's weights (10, 10, 5, 5); its RetinaNet and RPN use (1, 1, 1, 1) in both. The same
weights give the same boxes, so the network's coder weights are checked against these.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from os import PathLike
from typing import Literal

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, RetinaNet

from pvtlab.models.checkpoint import (
    CheckpointError,
    LoadReport,
    key_problem_lines,
    read_state_dict,
    unwrap_model,
)
from pvtlab.models.heads.semantic_fpn import SemanticFPN
from pvtlab.models.pvt import checkpoint_filter_fn as pvt_checkpoint_filter_fn

__all__ = [
    "ReleaseKind",
    "convert_release_state_dict",
    "load_release_checkpoint",
    "load_release_state_dict",
    "release_kind",
]

_logger = logging.getLogger(__name__)

ReleaseKind = Literal["retinanet", "mask_rcnn", "semantic_fpn"]

# The box coder weights equivalent to the release's target_stds (module docstring).
_RELEASE_CODER_WEIGHTS = {
    "RetinaNet's box coder": (1.0, 1.0, 1.0, 1.0),
    "the RPN's box coder": (1.0, 1.0, 1.0, 1.0),
    "the RoI head's box coder": (10.0, 10.0, 5.0, 5.0),
}


def release_kind(state_dict: Mapping[str, object]) -> ReleaseKind | None:
    """Which network of the release `state_dict` holds, told by its top-level module names
    (mmdetection's ``backbone``/``neck``/``bbox_head`` or ``rpn_head`` + ``roi_head``,
    mmsegmentation's ``decode_head``); None for anything else, pvtlab's own files included."""
    tops = {k.split(".", 1)[0] for k in state_dict if isinstance(k, str)}
    if not {"backbone", "neck"} <= tops:
        return None
    if "decode_head" in tops:
        return "semantic_fpn"
    if {"rpn_head", "roi_head"} <= tops:
        return "mask_rcnn"
    if "bbox_head" in tops:
        return "retinanet"
    return None


def _network_kind(model: nn.Module) -> ReleaseKind | None:
    if isinstance(model, RetinaNet):
        return "retinanet"
    if isinstance(model, MaskRCNN):
        return "mask_rcnn"
    if isinstance(model, SemanticFPN):
        return "semantic_fpn"
    return None


def _same(tensor: Tensor) -> Tensor:
    return tensor


def _background_last_to_first(tensor: Tensor) -> Tensor:
    """Classifier rows (K classes, background) -> (background, K classes)."""
    return torch.cat((tensor[-1:], tensor[:-1]))


def _zero_background_boxes(tensor: Tensor) -> Tensor:
    """Class-specific box rows (4 per class) -> four zero rows for background, then the classes'."""
    return torch.cat((tensor.new_zeros((4, *tensor.shape[1:])), tensor))


def _zero_background_map(tensor: Tensor) -> Tensor:
    """Mask logits' filters (one per class) -> a zero background filter, then the classes'."""
    return torch.cat((tensor.new_zeros((1, *tensor.shape[1:])), tensor))


@dataclass(frozen=True)
class _Rule:
    """File keys matching `pattern` (a regular expression) become `target` (its groups as \\1,
    \\2, ...) after `convert`."""

    pattern: str
    target: str
    convert: Callable[[Tensor], Tensor] = _same


def _conv_module(source: str, target: str) -> list[_Rule]:
    """An mmcv ``ConvModule`` without norm (``.conv.weight``, ``.conv.bias``) -> one conv.
    `source` may hold groups of its own, which `target` refers to."""
    parameter = re.compile(source).groups + 1
    return [_Rule(rf"{source}\.conv\.(weight|bias)", rf"{target}.\g<{parameter}>")]


def _fpn_rules(fpn: str, levels: int, extra: tuple[str, ...] = ()) -> list[_Rule]:
    """mmdetection / mmsegmentation FPN (``neck``) -> torchvision's FeaturePyramidNetwork at
    `fpn`: `levels` lateral and output convolutions, then the extra levels' convolutions."""
    rules: list[_Rule] = []
    for i in range(levels):
        rules += _conv_module(rf"neck\.lateral_convs\.{i}", f"{fpn}.inner_blocks.{i}.0")
        rules += _conv_module(rf"neck\.fpn_convs\.{i}", f"{fpn}.layer_blocks.{i}.0")
    for i, name in enumerate(extra, start=levels):
        rules += _conv_module(rf"neck\.fpn_convs\.{i}", f"{fpn}.extra_blocks.{name}")
    return rules


def _module_prefix(model: nn.Module, module: nn.Module) -> str:
    for name, candidate in model.named_modules():
        if candidate is module:
            return f"{name}." if name else ""
    raise CheckpointError(f"{type(module).__name__} is not part of {type(model).__name__}")


def _retinanet_rules(model: RetinaNet) -> list[_Rule]:
    levels = len(model.backbone.fpn.inner_blocks)
    rules = _fpn_rules("backbone.fpn", levels, extra=("p6", "p7"))
    for branch, tower in (("cls", "classification_head"), ("reg", "regression_head")):
        rules += _conv_module(rf"bbox_head\.{branch}_convs\.(\d+)", rf"head.{tower}.conv.\1.0")
    rules += [
        _Rule(r"bbox_head\.retina_cls\.(weight|bias)", r"head.classification_head.cls_logits.\1"),
        _Rule(r"bbox_head\.retina_reg\.(weight|bias)", r"head.regression_head.bbox_reg.\1"),
    ]
    return rules


def _mask_rcnn_rules(model: MaskRCNN) -> list[_Rule]:
    levels = len(model.backbone.fpn.inner_blocks)
    rules = _fpn_rules("backbone.fpn", levels)
    box, mask = r"roi_head\.bbox_head", r"roi_head\.mask_head"
    rules += [
        _Rule(r"rpn_head\.rpn_conv\.(weight|bias)", r"rpn.head.conv.0.0.\1"),
        _Rule(r"rpn_head\.rpn_cls\.(weight|bias)", r"rpn.head.cls_logits.\1"),
        _Rule(r"rpn_head\.rpn_reg\.(weight|bias)", r"rpn.head.bbox_pred.\1"),
        _Rule(rf"{box}\.shared_fcs\.0\.(weight|bias)", r"roi_heads.box_head.fc6.\1"),
        _Rule(rf"{box}\.shared_fcs\.1\.(weight|bias)", r"roi_heads.box_head.fc7.\1"),
        _Rule(
            rf"{box}\.fc_cls\.(weight|bias)",
            r"roi_heads.box_predictor.cls_score.\1",
            _background_last_to_first,
        ),
        _Rule(
            rf"{box}\.fc_reg\.(weight|bias)",
            r"roi_heads.box_predictor.bbox_pred.\1",
            _zero_background_boxes,
        ),
        _Rule(rf"{mask}\.upsample\.(weight|bias)", r"roi_heads.mask_predictor.conv5_mask.\1"),
        _Rule(
            rf"{mask}\.conv_logits\.(weight|bias)",
            r"roi_heads.mask_predictor.mask_fcn_logits.\1",
            _zero_background_map,
        ),
    ]
    rules += _conv_module(rf"{mask}\.convs\.(\d+)", r"roi_heads.mask_head.\1.0")
    return rules


def _semantic_fpn_rules(model: SemanticFPN) -> list[_Rule]:
    levels = len(model.backbone.fpn.inner_blocks)
    rules = _fpn_rules("backbone.fpn", levels)
    branch = r"decode_head\.scale_heads\.(\d+)\.(\d+)"
    rules += [
        _Rule(rf"{branch}\.conv\.(weight|bias)", r"head.branches.\1.\2.0.\3"),
        _Rule(
            rf"{branch}\.bn\.(weight|bias|running_mean|running_var|num_batches_tracked)",
            r"head.branches.\1.\2.1.\3",
        ),
        _Rule(r"decode_head\.conv_seg\.(weight|bias)", r"head.classifier.\1"),
    ]
    return rules


_RULES: dict[ReleaseKind, Callable[..., list[_Rule]]] = {
    "retinanet": _retinanet_rules,
    "mask_rcnn": _mask_rcnn_rules,
    "semantic_fpn": _semantic_fpn_rules,
}


def _coder_weights(model: nn.Module, kind: ReleaseKind) -> dict[str, tuple[float, ...]]:
    if kind == "retinanet":
        return {"RetinaNet's box coder": model.head.regression_head.box_coder.weights}
    if kind == "mask_rcnn":
        return {
            "the RPN's box coder": model.rpn.box_coder.weights,
            "the RoI head's box coder": model.roi_heads.box_coder.weights,
        }
    return {}


def _file_classes(state_dict: Mapping[str, Tensor], kind: ReleaseKind) -> int | None:
    """The number of classes the file's heads predict (background not counted)."""
    try:
        if kind == "retinanet":
            anchors = state_dict["bbox_head.retina_reg.weight"].shape[0] // 4
            return state_dict["bbox_head.retina_cls.weight"].shape[0] // anchors
        if kind == "mask_rcnn":
            return state_dict["roi_head.bbox_head.fc_cls.weight"].shape[0] - 1
        return state_dict["decode_head.conv_seg.weight"].shape[0]
    except (KeyError, ZeroDivisionError):
        return None


def _network_classes(model: nn.Module, kind: ReleaseKind) -> int:
    if kind == "retinanet":
        return model.head.classification_head.num_classes
    if kind == "mask_rcnn":
        return model.roi_heads.box_predictor.cls_score.out_features - 1
    return model.num_classes


_PVT_DEPTHS = {
    (2, 2, 2, 2): "pvt_tiny",
    (3, 4, 6, 3): "pvt_small",
    (3, 4, 18, 3): "pvt_medium",
    (3, 8, 27, 3): "pvt_large",
}


def _pvt_depths(keys: Iterable[str]) -> tuple[int, ...]:
    """Blocks per stage of a PVT state dict's keys (``block{stage}.{index}.*``)."""
    blocks = {tuple(k.split(".", 2)[:2]) for k in keys if k.startswith("block")}
    return tuple(sum(1 for b, _ in blocks if b == f"block{s}") for s in range(1, 5))


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def convert_release_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict"
) -> dict[str, Tensor]:
    """`state_dict` of a release checkpoint as `model`'s state dict, checked whole.

    Args:
        model: a pvtlab RetinaNet, Mask R-CNN or Semantic FPN (the head the file was trained
            with), on the file's PVT size and with its number of classes.
        state_dict: the file's ``state_dict`` (mmdetection / mmsegmentation names).
        source: what the error messages call the file.

    Raises:
        CheckpointError: the file is not a release checkpoint of `model`'s kind, or any key is
            left over, unfilled or of another shape (all of them listed).
    """
    kind = release_kind(state_dict)
    network = _network_kind(model)
    if kind is None:
        raise CheckpointError(
            f"{source} is not a whole-model checkpoint of the PVT release: expected mmdetection's "
            "backbone / neck / bbox_head (RetinaNet) or rpn_head / roi_head (Mask R-CNN), or "
            "mmsegmentation's backbone / neck / decode_head (Semantic FPN)"
        )
    if network != kind:
        raise CheckpointError(
            f"{source} is the release's {kind} checkpoint; the network is "
            f"{type(model).__name__} ({network or 'not a head the release published'}): "
            f"choose head={kind}"
        )
    for name, weights in _coder_weights(model, kind).items():
        if tuple(float(w) for w in weights) != _RELEASE_CODER_WEIGHTS[name]:
            raise CheckpointError(
                f"{source}: {name} has weights {tuple(weights)}; the release's head was trained "
                f"for {_RELEASE_CODER_WEIGHTS[name]} (its target_stds inverted), so its box "
                "deltas would decode to other boxes"
            )

    body = unwrap_model(model.backbone.body)
    backbone_prefix = _module_prefix(model, body)
    backbone = {
        k[len("backbone.") :]: v for k, v in state_dict.items() if k.startswith("backbone.")
    }
    file_shape = {f"{backbone_prefix}{k}": _shape(v) for k, v in backbone.items()}
    if hasattr(body, "pos_embed_sizes"):  # a PVT: stored grids resized to the network's
        backbone = pvt_checkpoint_filter_fn(backbone, body)
    rules = _RULES[kind](model)

    converted: dict[str, Tensor] = {f"{backbone_prefix}{k}": v for k, v in backbone.items()}
    origin = {f"{backbone_prefix}{k}": f"backbone.{k}" for k in backbone}
    unmapped: list[str] = []
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            continue
        for rule in rules:
            match = re.fullmatch(rule.pattern, key)
            if match:
                target = match.expand(rule.target)
                if target in converted:  # two file keys for one tensor: the rules are wrong
                    raise CheckpointError(
                        f"{source}: {origin[target]} and {key} both map to {target}"
                    )
                converted[target] = rule.convert(value)
                origin[target] = key
                file_shape[target] = _shape(value)
                break
        else:
            unmapped.append(f"{key} {_shape(value)}")

    expected = model.state_dict()
    unexpected = unmapped + [
        f"{origin[k]} {file_shape[k]} (-> {k}, which the network does not have)"
        for k in converted
        if k not in expected
    ]
    mismatched = [
        f"{origin[k]} {file_shape[k]} -> {k}: the network's is {_shape(expected[k])}"
        + ("" if _shape(v) == file_shape[k] else f" (converted {_shape(v)})")
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    ]
    # BatchNorm starts its own counter when the file has none
    missing = [
        f"{k} {_shape(v)}"
        for k, v in expected.items()
        if k not in converted and not k.endswith("num_batches_tracked")
    ]
    if unexpected or mismatched or missing:
        lines = [f"cannot load {source} (the release's {kind}) into {type(model).__name__}:"]
        file_classes, own_classes = _file_classes(state_dict, kind), _network_classes(model, kind)
        if file_classes is not None and file_classes != own_classes:
            lines.append(
                f"  the file's heads predict {file_classes} classes, the network {own_classes} "
                f"(data.num_classes={file_classes})"
            )
        file_depths, own_depths = _pvt_depths(backbone), _pvt_depths(body.state_dict())
        if file_depths != own_depths:
            name = _PVT_DEPTHS.get(file_depths)
            lines.append(
                f"  the file's PVT has depths {file_depths}, the network's backbone "
                f"{own_depths}" + (f" (backbone={name})" if name else "")
            )
        lines += key_problem_lines(
            ("in the file with no counterpart in the network", unexpected),
            ("shape mismatch", mismatched),
            ("missing from the file", missing),
        )
        raise CheckpointError("\n".join(lines))
    return {k: v.to(expected[k].dtype) for k, v in converted.items()}


def load_release_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], *, source: str = "state dict"
) -> LoadReport:
    """Convert (:func:`convert_release_state_dict`) and load a release state dict into `model`."""
    converted = convert_release_state_dict(model, state_dict, source=source)
    result = model.load_state_dict(converted, strict=False)
    left = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    if left or result.unexpected_keys:  # defensive: checked above
        raise CheckpointError(
            f"{source}: load left {left} missing, {result.unexpected_keys} unexpected"
        )
    kind = release_kind(state_dict)
    _logger.info("%s: the release's %s loaded (%d tensors)", source, kind, len(converted))
    if kind == "mask_rcnn":
        _logger.info(
            "%s: the box and mask predictors' background rows, which mmdetection does not "
            "have, are zero (never decoded nor trained)",
            source,
        )
    return LoadReport(source, loaded=sorted(converted))


def load_release_checkpoint(model: nn.Module, path: str | PathLike[str]) -> LoadReport:
    """Read a release checkpoint file with ``torch.load(weights_only=True)`` and load it into
    `model` strictly (see the module docstring)."""
    return load_release_state_dict(model, read_state_dict(path), source=str(path))
