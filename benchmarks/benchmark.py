#!/usr/bin/env python3
"""Inference and training throughput of pvtlab models, written as CSV in timm's benchmark schema.

    python benchmarks/benchmark.py                                    # the default smoke set
    python benchmarks/benchmark.py --models pvt_small detection/retinanet/pvt_small \\
        --batch-size 32 --img-size 224 --precision bf16 --compile --override data=coco data.num_classes=80

A model is either a timm name (a backbone with its own classifier, built by
``timm.create_model`` after ``import pvtlab``) or ``task/head/backbone``: the whole task model
that ``src/train.py`` would train, composed from the project's Hydra config (``conf/train.yaml``
with ``task=``, ``head=``, ``backbone=`` and any ``--override``) and built by
``pvtlab.pipeline.build_task``. Inputs are random tensors of the requested size (boxes, masks and
label maps for the task models), so no data set is read.

Inference times ``model(images)`` in eval mode without gradients; training times forward, loss,
backward and an AdamW step (a task model's loss is its own ``training_step``). Each timed run
follows ``--warmup`` untimed steps, and on CUDA the device is waited for before the clock starts
and after the last step, so a step's time covers the work it queued.

Results go to ``outputs/benchmarks/<timestamp>/results.csv`` unless ``--output-dir`` or
``--results-file`` says otherwise; the table is also printed. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig
from torch import Tensor, nn

import pvtlab  # noqa: F401  (registers the PVT family with timm)
from pvtlab.models.complexity import count_macs
from pvtlab.pipeline import build_task

log = logging.getLogger("benchmark")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
TASKS = ("classification", "detection", "segmentation")
# The smoke set `make bench` runs: the smallest PVT alone and under every head.
DEFAULT_MODELS = (
    "pvt_tiny",
    "classification/linear/pvt_tiny",
    "detection/retinanet/pvt_tiny",
    "detection/mask_rcnn/pvt_tiny",
    "detection/detr/pvt_tiny",
    "segmentation/semantic_fpn/pvt_tiny",
    "segmentation/trans2seg/pvt_tiny",
)
# timm's benchmark columns, then what says which variant of a model a row measured.
INFER_COLUMNS = (
    "infer_samples_per_sec",
    "infer_step_time",
    "infer_batch_size",
    "infer_img_size",
    "infer_gmacs",
)
TRAIN_COLUMNS = ("train_samples_per_sec", "train_step_time", "train_batch_size", "train_img_size")
COLUMNS = (
    "model",
    *INFER_COLUMNS,
    *TRAIN_COLUMNS,
    "param_count",
    "task",
    "head",
    "precision",
    "compile",
    "device",
)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ModelSpec:
    """What one row measures: a timm backbone alone, or a task model around one."""

    backbone: str
    task: str = ""
    head: str = ""

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        parts = text.split("/")
        if len(parts) == 1:
            return cls(parts[0])
        if len(parts) == 3 and parts[0] in TASKS:
            return cls(backbone=parts[2], task=parts[0], head=parts[1])
        raise ValueError(
            f"model {text!r}: give a timm name (pvt_tiny) or task/head/backbone with a task "
            f"among {', '.join(TASKS)} (detection/retinanet/pvt_tiny)"
        )


@dataclass
class Subject:
    """A model built for benchmarking, with how to feed it and train it.

    `inputs(images)` turns an image batch into what the model's forward takes;
    `training_batch(batch_size)` gives a batch in the layout its loss expects; `loss(batch)` the
    scalar training loss; `compile()` compiles it in place.
    """

    module: nn.Module
    network: nn.Module  # the parameters that count (a task model's network, without its metrics)
    inputs: Callable[[Tensor], Any]
    training_batch: Callable[[int], Any]
    loss: Callable[[Any], Tensor]
    compile: Callable[[], None]


# ------------------------------------------------------------------------------ synthetic inputs


def random_boxes(count: int, size: int, generator: torch.Generator) -> Tensor:
    """`count` boxes (x1, y1, x2, y2) of at least 4 pixels inside a `size` x `size` image."""
    corners = torch.rand(count, 2, generator=generator) * (size - 8)
    extents = 4 + torch.rand(count, 2, generator=generator) * (size - corners - 4)
    return torch.cat([corners, corners + extents], dim=1)


def box_masks(boxes: Tensor, size: int) -> Tensor:
    """One uint8 mask per box, filling the box."""
    coords = torch.arange(size, dtype=boxes.dtype)
    inside_x = (coords >= boxes[:, None, 0]) & (coords < boxes[:, None, 2])
    inside_y = (coords >= boxes[:, None, 1]) & (coords < boxes[:, None, 3])
    return (inside_y[:, :, None] & inside_x[:, None, :]).to(torch.uint8)


def detection_targets(
    batch_size: int, size: int, num_classes: int, device: torch.device, objects: int = 3
) -> list[dict[str, Tensor]]:
    """Targets as the COCO data module yields them: xyxy boxes in pixels, 0-based labels, masks."""
    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch_size):
        boxes = random_boxes(objects, size, generator)
        labels = torch.randint(num_classes, (objects,), generator=generator)
        target = {"boxes": boxes, "labels": labels, "masks": box_masks(boxes, size)}
        targets.append({key: value.to(device) for key, value in target.items()})
    return targets


# ------------------------------------------------------------------------------------- building


def build_backbone(
    spec: ModelSpec, img_size: int, device: torch.device, model_kwargs: dict[str, Any]
) -> Subject:
    """A timm classifier: the backbone with its own head, as timm's benchmark builds it."""
    model = timm.create_model(spec.backbone, pretrained=False, **model_kwargs).to(device)
    num_classes = model.num_classes

    def training_batch(batch_size: int) -> tuple[Tensor, Tensor]:
        images = torch.randn(batch_size, 3, img_size, img_size, device=device)
        return images, torch.randint(num_classes, (batch_size,), device=device)

    def loss(batch: tuple[Tensor, Tensor]) -> Tensor:
        images, labels = batch
        return F.cross_entropy(model(images), labels)

    def compile_model() -> None:
        model.compile()

    return Subject(model, model, lambda images: images, training_batch, loss, compile_model)


def compose_train_config(spec: ModelSpec, overrides: Sequence[str], output_dir: Path) -> DictConfig:
    """The run config `src/train.py task=... head=... backbone=... <overrides>` would use."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(
            config_name="train",
            overrides=[
                f"task={spec.task}",
                f"head={spec.head}",
                f"backbone={spec.backbone}",
                f"++paths.output_dir='{output_dir}'",  # outside a Hydra run there is no run folder
                *overrides,
            ],
        )


def build_task_model(
    spec: ModelSpec, img_size: int, device: torch.device, overrides: Sequence[str], output_dir: Path
) -> Subject:
    """The LightningModule of a task, head and backbone, driven through its own steps."""
    cfg = compose_train_config(spec, overrides, output_dir)
    task = build_task(cfg).to(device)
    num_classes = int(cfg.data.num_classes)

    detection = spec.task == "detection"

    def inputs(images: Tensor) -> Any:
        return list(images) if detection else images  # detectors take a list of images

    def training_batch(batch_size: int) -> Any:
        images = torch.randn(batch_size, 3, img_size, img_size, device=device)
        if detection:
            return list(images), detection_targets(batch_size, img_size, num_classes, device)
        if spec.task == "segmentation":
            labels = torch.randint(num_classes, (batch_size, img_size, img_size), device=device)
            return {"image": images, "label": labels}
        return images, torch.randint(num_classes, (batch_size,), device=device)

    return Subject(
        module=task,
        network=task.model,
        inputs=inputs,
        training_batch=training_batch,
        loss=lambda batch: task.training_step(batch, 0),
        compile=task.compile_model,  # what `compile=true` compiles in training
    )


class _TensorForward(nn.Module):
    """A subject's forward behind a plain image-tensor input, for the MAC counter."""

    def __init__(self, subject: Subject) -> None:
        super().__init__()
        self.module = subject.module
        self._inputs = subject.inputs

    def forward(self, images: Tensor) -> Any:
        # With gradients on: torch's module tracker, which the counter uses, fails on views of
        # parameters taken without them (DETR's queries). Only the forward pass is counted.
        with torch.enable_grad():
            return self.module(self._inputs(images))


def gmacs_per_sample(subject: Subject, img_size: int) -> float:
    """Multiply-accumulates of one image's forward pass, in billions (timm's `infer_gmacs`),
    counted by pvtlab's counter, which includes the attention products."""
    return count_macs(_TensorForward(subject), (img_size, img_size), batch_size=1) / 1e9


# -------------------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], Any], warmup: int, steps: int, device: torch.device) -> float:
    """Mean seconds of `step` over `steps` calls after `warmup` untimed ones; the device is
    waited for at both ends of the timed span."""
    for _ in range(warmup):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    return (time.perf_counter() - start) / steps


def autocast(device: torch.device, precision: str) -> AbstractContextManager[Any]:
    dtype = PRECISIONS[precision]
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def benchmark_inference(
    subject: Subject, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    subject.module.eval()
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    inputs = subject.inputs(images)

    def step() -> None:
        with torch.no_grad(), autocast(device, args.precision):
            subject.module(inputs)

    seconds = time_steps(step, args.warmup, args.steps, device)
    return {
        "infer_samples_per_sec": round(args.batch_size / seconds, 2),
        "infer_step_time": round(1000 * seconds, 3),  # milliseconds, as timm
        "infer_batch_size": args.batch_size,
        "infer_img_size": args.img_size,
    }


def benchmark_training(
    subject: Subject, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    subject.module.train()
    batch = subject.training_batch(args.batch_size)
    trainable = [p for p in subject.module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step() -> None:
        with autocast(device, args.precision):
            loss = subject.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = time_steps(step, args.warmup, args.steps, device)
    return {
        "train_samples_per_sec": round(args.batch_size / seconds, 2),
        "train_step_time": round(1000 * seconds, 3),
        "train_batch_size": args.batch_size,
        "train_img_size": args.img_size,
    }


def benchmark_model(
    spec: ModelSpec, args: argparse.Namespace, device: torch.device, output_dir: Path
) -> dict[str, Any]:
    """One CSV row: the requested measurements of one model."""
    torch.manual_seed(args.seed)
    if spec.task:
        subject = build_task_model(spec, args.img_size, device, args.override, output_dir)
    else:
        subject = build_backbone(spec, args.img_size, device, args.model_kwargs)
    row: dict[str, Any] = {
        "model": spec.backbone,
        "param_count": round(sum(p.numel() for p in subject.network.parameters()) / 1e6, 2),
        "task": spec.task,
        "head": spec.head,
        "precision": args.precision,
        "compile": args.compile,
        "device": device.type,
    }
    if args.bench in ("infer", "both"):
        row["infer_gmacs"] = round(gmacs_per_sample(subject, args.img_size), 2)
    if args.compile:
        subject.compile()
    if args.bench in ("infer", "both"):
        row.update(benchmark_inference(subject, args, device))
    if args.bench in ("train", "both"):
        row.update(benchmark_training(subject, args, device))
    return row


# --------------------------------------------------------------------------------------- output


def default_output_dir() -> Path:
    """`outputs/benchmarks/<timestamp>` under the working directory (git-ignored)."""
    return Path("outputs") / "benchmarks" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def write_results(rows: Sequence[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(rows)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The measured columns of `rows` as aligned text, one line per row."""
    columns = [c for c in COLUMNS if any(row.get(c, "") != "" for row in rows)]
    cells = [[str(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- command


def parse_key_value(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected key=value")
    for kind in (int, float):
        try:
            return key, kind(value)
        except ValueError:
            pass
    return key, {"true": True, "false": False}.get(value.lower(), value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        help="timm names and/or task/head/backbone (default: the smoke set)",
    )
    parser.add_argument("--bench", choices=("infer", "train", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--img-size", type=int, default=224, help="square input side in pixels")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="fp32")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    parser.add_argument("--steps", type=int, default=3, help="timed steps")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--model-kwargs",
        nargs="*",
        type=parse_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="extra timm.create_model arguments of the backbones alone (img_size=384)",
    )
    parser.add_argument(
        "--override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides of the task models' config (data=coco, head.fpn_channels=256)",
    )
    parser.add_argument("--output-dir", type=Path, default=None, help=default_output_dir.__doc__)
    parser.add_argument(
        "--results-file", type=Path, default=None, help="default: <output-dir>/results.csv"
    )
    args = parser.parse_args(argv)
    args.model_kwargs = dict(args.model_kwargs)
    args.specs = [ModelSpec.parse(text) for text in args.models]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    # A task's training_step logs its loss; outside a Trainer, Lightning warns and skips that.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    output_dir = args.output_dir or default_output_dir()
    results_file = args.results_file or output_dir / "results.csv"
    rows, failed = [], []
    for spec, text in zip(args.specs, args.models, strict=True):
        log.info("benchmarking %s (%s, %s, compile=%s)", text, device, args.precision, args.compile)
        try:
            rows.append(benchmark_model(spec, args, device, output_dir))
        except Exception:  # one model that fails is reported; the others still run
            log.exception("%s failed", text)
            failed.append(text)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    write_results(rows, results_file)
    print(format_table(rows))
    log.info("wrote %s", results_file)
    if failed:
        log.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
