"""COCO evaluation time: pvtlab's scoring (`pvtlab.evaluation.coco.coco_evaluate`, faster-coco-eval's
C++ COCOeval) against pycocotools' Python COCOeval, the reference, on a synthetic COCO-like
validation set; the detectors suite reports it.

A COCO validation pass ends with rank 0 scoring every detection while the other processes wait,
and pycocotools' time grows with the images x categories its Python loops visit: val2017 has ten
times the images of the set timed here.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pvtlab.bench import markdown_table, time_interleaved
from pvtlab.evaluation.coco import STAT_NAMES, coco_evaluate

__all__ = [
    "EvaluationRow",
    "evaluation_section",
    "evaluation_times",
    "pycocotools_evaluate",
    "synthetic_coco",
]

CATEGORIES = 80


class EvaluationRow(NamedTuple):
    iou_type: str
    images: int
    detections: int
    pycocotools_s: float
    pvtlab_s: float
    max_ap_difference: float  # over COCOeval's six AP figures


def _polygon(x: float, y: float, w: float, h: float) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def synthetic_coco(
    images: int, seed: int = 0, height: int = 480, width: int = 640, masks: bool = False
) -> tuple[COCO, list[dict[str, Any]]]:
    """A ground truth of 1-14 boxes an image over `CATEGORIES` categories (1% crowd, polygons),
    and COCO-format results at RetinaNet's density: 3 jittered detections of each truth and
    60 false positives an image, with RLE masks of their boxes if `masks`."""
    rng = np.random.default_rng(seed)
    annotations, results = [], []

    def result(image_id: int, category: int, box: Sequence[float], score: float) -> None:
        entry = {"image_id": image_id, "category_id": category, "score": score}
        entry["bbox"] = [float(v) for v in box]
        if masks:
            rle = mask_util.merge(mask_util.frPyObjects(_polygon(*box), height, width))
            entry["segmentation"] = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
        results.append(entry)

    for image_id in range(1, images + 1):
        for _ in range(int(rng.integers(1, 15))):
            w, h = rng.uniform(6, 300), rng.uniform(6, 300)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.integers(1, CATEGORIES + 1))
            annotations.append(
                {"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                 "bbox": [x, y, w, h], "area": w * h, "iscrowd": int(rng.uniform() < 0.01),
                 "segmentation": _polygon(x, y, w, h)}
            )  # fmt: skip
            for _ in range(3):
                dx, dy, dw, dh = rng.normal(0, 0.08, 4) * [w, h, w, h]
                box = (max(0.0, x + dx), max(0.0, y + dy), max(1.0, w + dw), max(1.0, h + dh))
                result(image_id, category, box, float(rng.uniform()))
        for _ in range(60):
            w, h = rng.uniform(6, 200), rng.uniform(6, 200)
            box = (rng.uniform(0, width - w), rng.uniform(0, height - h), w, h)
            result(image_id, int(rng.integers(1, CATEGORIES + 1)), box, float(rng.uniform(0, 0.5)))
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "height": height, "width": width} for i in range(1, images + 1)],
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(1, CATEGORIES + 1)],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco, results


def pycocotools_evaluate(
    coco_gt: COCO,
    results: Sequence[dict[str, Any]],
    iou_type: str,
    image_ids: Iterable[int] | None = None,
) -> dict[str, float]:
    """The six AP figures of pycocotools' own COCOeval (the reference), named as
    `coco_evaluate`'s, NaN where COCOeval has no ground truth (its -1)."""
    field = "segmentation" if iou_type == "segm" else "bbox"
    keep = ("image_id", "category_id", "score", field)
    dets = [{k: v for k, v in r.items() if k in keep} for r in results]  # loadRes adds keys
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted({int(i) for i in image_ids})
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    prefix = "segm_" if iou_type == "segm" else ""
    return {
        f"{prefix}{name}": float(v) if v >= 0 else math.nan
        for name, v in zip(STAT_NAMES, evaluator.stats, strict=False)
    }


def _max_difference(a: dict[str, float], b: dict[str, float]) -> float:
    return max(0.0 if math.isnan(a[k]) and math.isnan(b[k]) else abs(a[k] - b[k]) for k in a)


def _evaluation_row(iou_type: str, images: int, repeats: int) -> EvaluationRow:
    coco, results = synthetic_coco(images, masks=iou_type == "segm")
    paths = {  # both copy the result dicts they keep, so `results` stays as it is
        "pycocotools": lambda: pycocotools_evaluate(coco, results, iou_type),
        "pvtlab": lambda: coco_evaluate(coco, results, iou_type)[0],
    }
    seconds = time_interleaved(paths, warmup=0, repeats=repeats)
    difference = _max_difference(paths["pycocotools"](), paths["pvtlab"]())
    return EvaluationRow(
        iou_type, images, len(results), seconds["pycocotools"], seconds["pvtlab"], difference
    )


def evaluation_times(quick: bool) -> list[EvaluationRow]:
    """Seconds to score a synthetic validation set by each implementation (boxes: 500 images,
    masks: 200; quick: 10 and 5), timed in turns, and their largest AP difference."""
    repeats = 1 if quick else 2
    return [
        _evaluation_row("bbox", 10 if quick else 500, repeats),
        _evaluation_row("segm", 5 if quick else 200, repeats),
    ]


def evaluation_section(rows: Sequence[EvaluationRow]) -> str:
    """The report's table of `evaluation_times`."""
    return (
        "## COCO evaluation (rank 0, after every validation pass)\n\n"
        "Scoring a synthetic validation set of 640 x 480 images (1-14 objects an image over 80 "
        "categories; 3 jittered detections of each and 60 false positives an image, RetinaNet's "
        "density) with pycocotools' COCOeval, the reference, and with pvtlab's "
        "`pvtlab.evaluation.coco.coco_evaluate` (faster-coco-eval's C++ COCOeval on the same "
        "index): seconds including the results' loading, median of runs taken in turns.\n\n"
        + markdown_table(
            [
                "IoU",
                "images",
                "detections",
                "pycocotools s",
                "pvtlab s",
                "speed-up",
                "largest AP difference",
            ],
            [
                (
                    r.iou_type,
                    r.images,
                    r.detections,
                    r.pycocotools_s,
                    r.pvtlab_s,
                    r.pycocotools_s / r.pvtlab_s,
                    f"{r.max_ap_difference:.1e}",
                )
                for r in rows
            ],
        )
    )
