"""What an exported file says about itself: task, classes, preprocessing, network, input layout.

An exported graph takes normalised pixels and returns raw tensors (`pvtlab.export.graphs`); to
use it without pvtlab one needs the rest of the checkpoint's description. :func:`export_metadata`
writes it as string pairs, stored as ONNX ``metadata_props`` (``onnx.load(path).metadata_props``,
``onnxruntime.InferenceSession(path).get_modelmeta().custom_metadata_map``):

================== =======================================================================
key                value
================== =======================================================================
pvtlab.task        ``classification``, ``detection`` or ``segmentation``
pvtlab.backbone    the backbone's name (``pvt_small``)
pvtlab.head        the head's module (``trans2seg``; ``linear`` for the classifier)
pvtlab.class_names JSON list, in label order (``class_<i>`` where the checkpoint names none)
pvtlab.category_ids detection: JSON list, the data set's id of each label (COCO's ids)
pvtlab.preprocessing JSON: ``resize`` (the evaluation's rule in words), its sizes, ``mean`` and
                   ``std`` on the 0-255 scale: ``(pixel - mean) / std`` per RGB channel
pvtlab.input       JSON: the input's name, ``NCHW`` float32 RGB, sides a multiple of 32
pvtlab.outputs     JSON list of the output names, in order
pvtlab.model_config JSON: the checkpoint's whole model description (rebuilds the network)
================== =======================================================================
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from typing import Any

from pvtlab.config import head_kind
from pvtlab.data.config import as_config
from pvtlab.export.graphs import SIZE_DIVISOR

__all__ = ["export_metadata", "preprocessing_metadata"]


def _on_255_scale(values: Sequence[float]) -> list[float]:
    return [round(255 * float(v), 6) for v in values]


def _classification(settings: Mapping[str, Any]) -> dict[str, Any]:
    from pvtlab.data.transforms import ClassificationTransformConfig, classification_transform

    config = as_config(settings, ClassificationTransformConfig(), "preprocessing")
    defaults = {
        name: p.default
        for name, p in inspect.signature(classification_transform).parameters.items()
    }
    options = {**defaults, **dict(config.eval)}
    size = int(config.image_size)
    return {
        "resize": "shorter side to floor(size / crop_pct) (keep ratio), then the centre "
        "size x size crop",
        "size": [size, size],
        "crop_pct": float(options["crop_pct"]),
        "interpolation": str(options["interpolation"]),
        "mean": _on_255_scale(options["mean"]),  # timm normalises on the 0-1 scale
        "std": _on_255_scale(options["std"]),
    }


def _detection(settings: Mapping[str, Any]) -> dict[str, Any]:
    from pvtlab.data.detection_transforms import DetectionTransformConfig

    config = as_config(settings, DetectionTransformConfig(), "preprocessing")
    return {
        "resize": "keep ratio: shorter side to short_side, longer side at most max_size",
        "short_side": int(config.test_short_side),
        "max_size": None if config.max_size is None else int(config.max_size),
        "interpolation": "bilinear",
        "mean": _on_255_scale(config.mean),
        "std": _on_255_scale(config.std),
    }


def _segmentation(settings: Mapping[str, Any]) -> dict[str, Any]:
    from pvtlab.data.segmentation_transforms import SegmentationTransformConfig

    transform = as_config(settings, SegmentationTransformConfig(), "preprocessing").eval()
    return {
        "resize": "keep ratio to the largest size whose long side <= max(scale) and short side "
        "<= min(scale), each side then stretched up to a multiple of size_divisor",
        "scale": [int(s) for s in transform.scale],
        "size_divisor": transform.size_divisor,
        "interpolation": "bilinear",
        "mean": [float(m) for m in transform.mean],
        "std": [float(s) for s in transform.std],
    }


_PREPROCESSING = {
    "classification": _classification,
    "detection": _detection,
    "segmentation": _segmentation,
}


def preprocessing_metadata(kind: str, preprocessing: Mapping[str, Any] | None) -> dict[str, Any]:
    """The evaluation preprocessing of a run's data `transforms` group (None: the kind's
    defaults), as plain values: the resize rule and its sizes, mean and std on the 0-255 scale."""
    settings = {k: v for k, v in dict(preprocessing or {}).items() if k != "_target_"}
    return _PREPROCESSING[kind](settings)


def export_metadata(
    description: Mapping[str, Any], output_names: Sequence[str], input_name: str
) -> dict[str, str]:
    """The string pairs an exported file carries (the module docstring lists them), from the
    checkpoint's model description."""
    from pvtlab.inference import ClassNames

    kind = head_kind(description["head"])
    if kind is None:
        raise ValueError(f"{description['head'].get('_target_')} is not a pvtlab head")
    classes = ClassNames.from_model_config(description, "the checkpoint", kind)
    values: dict[str, Any] = {
        "task": kind,
        "backbone": description["backbone"]["name"],
        "head": str(description["head"]["_target_"]).rpartition(".")[0].rpartition(".")[2],
        "class_names": list(classes.names),
        "preprocessing": preprocessing_metadata(kind, description.get("preprocessing")),
        "input": {
            "name": input_name,
            "layout": "NCHW",
            "dtype": "float32",
            "channels": "RGB",
            "size_divisor": SIZE_DIVISOR,
        },
        "outputs": list(output_names),
        "model_config": dict(description),
    }
    if kind == "detection":  # an output: the data set's id of each label
        values["category_ids"] = list(classes.category_ids)
    return {
        f"pvtlab.{key}": value if isinstance(value, str) else json.dumps(value)
        for key, value in values.items()
    }
