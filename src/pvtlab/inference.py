"""Run a trained checkpoint on pictures: ``predictor = pvtlab.load("best.ckpt")``.

Everything comes from the checkpoint alone: the network and its task (`pvtlab.pipeline.
task_from_checkpoint`), the class names and the data set's category ids, and the evaluation
preprocessing of the run's data (`model_config["preprocessing"]`, the `transforms` group). A
picture goes through the same steps as evaluation: decoded to RGB (`pvtlab.data.images`), the
data set's evaluation transform, the network, and the evaluation's own post-processing (the
segmentation task's inference, detections rescaled to the original pixels), so a data set's
images get the predictions `src/eval.py` scores.

A call takes one picture or a sequence: PIL images, numpy arrays (H, W[, C], uint8), file paths,
or tensors ((C, H, W) or (B, C, H, W), uint8 or floats in [0, 1]). Per picture it returns

- classification: ``{"labels", "names", "probabilities"}``, the top-k classes, best first;
- detection: ``{"boxes", "scores", "labels", "names", "category_ids"[, "masks"]}``, boxes xyxy
  in the picture's pixels, masks (N, H, W) booleans at its size (Mask R-CNN);
- segmentation: ``{"label_map"}``, (H, W) class indices at the picture's size.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as TF

from pvtlab.data.config import as_config
from pvtlab.data.images import read_rgb, to_rgb
from pvtlab.tasks.base import FROZEN_WEIGHTS, TaskModule, frozen_weight_compilation

__all__ = ["ClassNames", "ImageInput", "Predictor", "load"]

log = logging.getLogger(__name__)

ImageInput = Image.Image | np.ndarray | Tensor | str | os.PathLike

# torch.autocast's dtype for each Lightning precision a predictor runs under.
AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {
    "32-true": None,
    "32": None,
    "bf16-mixed": torch.bfloat16,
    "16-mixed": torch.float16,
}


@dataclass(frozen=True)
class ClassNames:
    """The classes a network predicts, in label order: their names and the data set's ids
    (COCO category ids for detection; 0..K-1 elsewhere unless the data set says otherwise)."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]

    @classmethod
    def from_model_config(
        cls, model_config: Mapping[str, Any], source: str, kind: str = "detection"
    ) -> ClassNames:
        """What a checkpoint's model description records, or `class_<i>` names and 1-based ids
        (COCO's convention) when it records none, with a warning naming `source` (about ids only
        for detection, where they are an output)."""
        num_classes = int(model_config["num_classes"])
        names = model_config.get("class_names")
        if not names or len(names) != num_classes:
            log.warning(
                "%s records no class names for its %d classes: predictions are named class_<i>",
                source,
                num_classes,
            )
            names = [f"class_{i}" for i in range(num_classes)]
        ids = model_config.get("category_ids")
        if not ids or len(ids) != num_classes:
            if kind == "detection":
                log.warning(
                    "%s records no category ids: detections get ids 1..%d in label order",
                    source,
                    num_classes,
                )
            ids = list(range(1, num_classes + 1))
        return cls(tuple(str(n) for n in names), tuple(int(i) for i in ids))

    def __len__(self) -> int:
        return len(self.names)


def as_pil(image: ImageInput) -> Image.Image:
    """One picture as an RGB PIL image: files are decoded as the loaders do (`read_rgb`)."""
    if isinstance(image, str | os.PathLike):
        return read_rgb(image)
    if isinstance(image, Image.Image):
        return to_rgb(image)
    if isinstance(image, Tensor):
        image = image.detach().cpu()
        if image.is_floating_point():
            image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
        if image.ndim == 3:
            image = image.permute(1, 2, 0)
        image = image.numpy()
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"arrays are taken as 8-bit pictures; got dtype {image.dtype}")
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]
        return to_rgb(Image.fromarray(np.ascontiguousarray(image)))
    raise TypeError(
        f"cannot predict on a {type(image).__name__}: give PIL images, numpy arrays, file paths "
        "or tensors"
    )


def _as_list(images: ImageInput | Sequence[ImageInput]) -> tuple[list[ImageInput], bool]:
    """The pictures of a call and whether it was given one picture (answered with one dict)."""
    if isinstance(images, Tensor) and images.ndim == 4:
        return list(images), False
    if isinstance(images, list | tuple):
        return list(images), False
    return [images], True


class Predictor:
    """A trained network with its preprocessing, class names and precision, called on pictures.

    Args:
        task: the task rebuilt from the checkpoint (its network and evaluation post-processing).
        classes: the class names and category ids, in label order.
        preprocessing: the run's data `transforms` group (None: the kind's defaults).
        device: where the network runs.
        precision: a Lightning precision the network runs under (`AUTOCAST_DTYPES`).
        top_k: classes reported per picture by a classifier (capped at the number of classes).
    """

    def __init__(
        self,
        task: TaskModule,
        classes: ClassNames,
        preprocessing: Mapping[str, Any] | None = None,
        device: str | torch.device = "cpu",
        precision: str = "32-true",
        top_k: int = 5,
    ) -> None:
        precision = str(precision)
        if precision not in AUTOCAST_DTYPES:
            raise ValueError(
                f"precision={precision!r}: a predictor runs under one of {sorted(AUTOCAST_DTYPES)}"
            )
        self.kind = str(task.kind)
        self.device = torch.device(device)
        self.task = task.to(self.device).eval()
        self.classes = classes
        self.autocast_dtype = AUTOCAST_DTYPES[precision]
        self.top_k = max(1, min(int(top_k), len(classes)))
        self.transform = evaluation_transform(self.kind, preprocessing)
        self.compiled = False

    @classmethod
    def from_checkpoint(
        cls,
        ckpt_path: str | os.PathLike[str],
        device: str | torch.device | None = None,
        precision: str = "32-true",
        top_k: int = 5,
    ) -> Predictor:
        """The predictor of a pvtlab checkpoint; `device` None: CUDA when available."""
        from pvtlab.pipeline import task_from_checkpoint  # pipeline pulls in Hydra and Lightning

        task = task_from_checkpoint(ckpt_path)
        model_config = dict(task.hparams.get("model_config") or {})
        preprocessing = model_config.get("preprocessing")
        if preprocessing is None:
            log.warning(
                "%s records no preprocessing: using the %s defaults of pvtlab's data transforms",
                ckpt_path,
                task.kind,
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        return cls(
            task,
            ClassNames.from_model_config(model_config, str(ckpt_path), task.kind),
            preprocessing,
            device,
            precision,
            top_k,
        )

    def compile(self) -> Predictor:
        """`torch.compile` the network with its weights frozen in, as `src/eval.py compile=true`."""
        self.task.compile_model(options=FROZEN_WEIGHTS)
        self.compiled = True
        return self

    def __call__(
        self, images: ImageInput | Sequence[ImageInput]
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Predictions for one picture (a dict) or a sequence of pictures (a list of dicts)."""
        pictures, single = _as_list(images)
        results = self.predict([as_pil(p) for p in pictures])
        return results[0] if single else results

    def predict(self, pictures: Sequence[Image.Image]) -> list[dict[str, Any]]:
        """Predictions for a batch of RGB pictures, in one forward pass."""
        if not pictures:
            return []
        with self._running():
            if self.kind == "classification":
                return self._classify(pictures)
            if self.kind == "detection":
                return self._detect(pictures)
            return self._segment(pictures)

    @contextlib.contextmanager
    def _running(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.inference_mode())
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
            if self.compiled:
                stack.enter_context(frozen_weight_compilation())
            yield

    # ------------------------------------------------------------------------------ per kind

    def _classify(self, pictures: Sequence[Image.Image]) -> list[dict[str, Any]]:
        batch = torch.stack([self.transform(p) for p in pictures]).to(self.device)
        probabilities = self.task.model(batch).float().softmax(dim=-1).cpu()
        top, labels = probabilities.topk(self.top_k, dim=-1)
        return [
            {
                "labels": label,
                "names": [self.classes.names[i] for i in label.tolist()],
                "probabilities": p,
            }
            for label, p in zip(labels, top, strict=True)
        ]

    def _detect(self, pictures: Sequence[Image.Image]) -> list[dict[str, Any]]:
        from pvtlab.evaluation.coco import rescale_prediction

        inputs = [
            self.transform(tv_tensors.Image(TF.pil_to_tensor(p))).as_subclass(Tensor)
            for p in pictures
        ]
        outputs = self.task.model([x.to(self.device) for x in inputs])
        results = []
        for picture, image, output in zip(pictures, inputs, outputs, strict=True):
            scaled = rescale_prediction(output, image.shape[-2:], (picture.height, picture.width))
            labels = scaled["labels"].cpu()
            result = {
                "boxes": scaled["boxes"].cpu(),
                "scores": scaled["scores"].cpu(),
                "labels": labels,
                "names": [self.classes.names[i] for i in labels.tolist()],
                "category_ids": torch.tensor(
                    [self.classes.category_ids[i] for i in labels.tolist()], dtype=torch.int64
                ),
            }
            if "masks" in scaled:
                result["masks"] = scaled["masks"].cpu()
            results.append(result)
        return results

    def _segment(self, pictures: Sequence[Image.Image]) -> list[dict[str, Any]]:
        from pvtlab.data.segmentation import collate_segmentation

        samples = []
        for picture in pictures:
            pixels = torch.from_numpy(np.array(picture)).permute(2, 0, 1)
            image, _ = self.transform(pixels, torch.empty(0, 0, dtype=torch.uint8))
            samples.append({"image": image, "label": torch.empty(0, 0), "name": ""})
        # The evaluation batch: images padded as in evaluation; the scores come back at each
        # picture's own size (where evaluation has its label map).
        batch = collate_segmentation(samples)
        batch["image"] = batch["image"].to(self.device)
        batch["label_size"] = torch.tensor([(p.height, p.width) for p in pictures])
        dtype = torch.uint8 if len(self.classes) <= 256 else torch.int64
        return [
            {"label_map": scores.argmax(dim=0).to(dtype).cpu()}
            for scores, _ in self.task.label_scores(batch)
        ]


def evaluation_transform(kind: str, preprocessing: Mapping[str, Any] | None) -> Any:
    """The evaluation transform of a run's data `transforms` group, built by the data code
    itself: PIL -> tensor for classification, (image, target) for detection, (image, label)
    for segmentation."""
    settings = {k: v for k, v in dict(preprocessing or {}).items() if k != "_target_"}
    if kind == "classification":
        from pvtlab.data.transforms import ClassificationTransformConfig

        return as_config(settings, ClassificationTransformConfig(), "preprocessing").build(False)
    if kind == "detection":
        from pvtlab.data.detection_transforms import DetectionTransformConfig

        return as_config(settings, DetectionTransformConfig(), "preprocessing").eval()
    if kind == "segmentation":
        from pvtlab.data.segmentation_transforms import SegmentationTransformConfig

        return as_config(settings, SegmentationTransformConfig(), "preprocessing").eval()
    raise ValueError(f"no prediction for task kind {kind!r}")


def load(
    ckpt_path: str | os.PathLike[str],
    device: str | torch.device | None = None,
    precision: str = "32-true",
    top_k: int = 5,
) -> Predictor:
    """The predictor of a pvtlab checkpoint, for notebooks and scripts::

        predictor = pvtlab.load("outputs/detection/runs/.../checkpoints/best.ckpt")
        result = predictor("photo.jpg")  # boxes, scores, labels, names

    Args:
        ckpt_path: a `.ckpt` written by a pvtlab run.
        device: where the network runs; None: CUDA when available, else the CPU.
        precision: "32-true", "bf16-mixed" or "16-mixed".
        top_k: classes reported per picture by a classifier.
    """
    return Predictor.from_checkpoint(Path(ckpt_path), device, precision, top_k)
