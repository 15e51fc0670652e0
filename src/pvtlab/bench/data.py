"""Data benchmark: images per second of each DataModule's training loader against the rate
PVT-Tiny's training step consumes them, in two settings: the shapes recipes (64 px, what
`make train` reads) and the real data sets' recipes (DeiT's ImageNet augmentation, COCO at
shorter side 800, ADE20K's 512 crops) on shapes files written at those data sets' image sizes.

    python src/bench.py suites=[data] [quick=true]

Target (issue 10, reported as a ratio, never asserted): every training loader delivers at least
3x the images per second of the PVT-Tiny training step of its task.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from hydra.utils import instantiate

from pvtlab.bench import bench_device, markdown_table, report_header, write_report
from pvtlab.bench.plots import bar_chart, new_figure, save_figure
from pvtlab.bench.steps import QUICK_DATA, SHAPES_DATA, compose_run, measure_training_step
from pvtlab.data.shapes import ensure_shapes

__all__ = ["REAL_RECIPES", "RealRecipe", "count_images", "loader_images_per_s", "run"]

TARGET_LOADER_RATIO = 3.0
KINDS = (
    ("classification", "linear", "ImageFolderDataModule"),
    ("detection", "retinanet", "CocoDataModule"),
    ("segmentation", "semantic_fpn", "ADE20KDataModule"),
)


class RealRecipe(NamedTuple):
    """A real data set's recipe, read from shapes files of that set's format and image size."""

    task: str
    head: str
    data: str  # the conf/data choice: its DataModule, and recipe/<data>_<task>.yaml
    side: int  # pixels: the side of the square shapes images written
    files: int  # training images written (the loader cycles over them)
    quick: tuple[str, ...]  # overrides of quick runs: small inputs and batches


# ImageNet's and COCO's photos are mostly 500 and 640 px on their longer side; 512 px is the
# shorter side ADE20K's recipe scales to. Quick runs write QUICK_SIDE px files and shrink
# every input to 64-96 px.
QUICK_SIDE = 96
REAL_RECIPES = (
    RealRecipe(
        "classification", "linear", "imagenet", 500, 512,
        ("data.image_size=64", "data.batch_size=4"),
    ),
    RealRecipe(
        "detection", "retinanet", "coco", 640, 128,
        ("data.train_short_side=[96]", "data.max_size=96"),
    ),
    RealRecipe(
        "segmentation", "semantic_fpn", "ade20k", 512, 128,
        ("data.crop_size=[64,64]", "data.scale=[256,64]"),
    ),
)  # fmt: skip


def count_images(batch: Any) -> int:
    """Images in a collated training batch of any task: a dict with an "image" tensor
    (segmentation), an (images, targets) pair (classification, detection) or a bare tensor."""
    if isinstance(batch, Mapping):
        images = batch["image"]
    elif isinstance(batch, list | tuple):
        images = batch[0]
    else:
        images = batch
    return len(images)


def loader_images_per_s(
    task: str,
    data_dir: Path,
    images: int,
    extra: Sequence[str] = (),
    data: Sequence[str] = SHAPES_DATA,
) -> tuple[float, dict[str, Any]]:
    """Images per second of the task's training loader for the `data` overrides (default: the
    shapes recipe) over `images` images (epoch after epoch if the set is smaller), and the
    loader's settings. Untimed first: one batch from each worker, which carries that worker's
    start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(
            [
                f"task={task}",
                *data,
                f"paths.data_dir={data_dir}",
                f"paths.log_dir={tmp}",
                *extra,
            ],
            Path(tmp) / "run",
        )
        datamodule = instantiate(cfg.data)
        datamodule.prepare_data()
        datamodule.setup("fit")
        loader = datamodule.train_dataloader()
        settings = {
            "batch": loader.batch_size,
            "workers": loader.num_workers,
            "pin_memory": loader.pin_memory,
            "persistent": loader.persistent_workers,
        }
        warmup = max(loader.num_workers, 1)
        seen, start = 0, 0.0
        for i, batch in enumerate(_epochs(loader)):
            if i < warmup:
                start = time.perf_counter()
                continue
            seen += count_images(batch)
            if seen >= images:
                break
        seconds = time.perf_counter() - start
    return (seen / seconds if seconds > 0 and seen else float("nan")), settings


def _epochs(loader: Any) -> Iterator[Any]:
    """The loader's batches, epoch after epoch, until an epoch yields none."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return


def data_overrides(recipe: RealRecipe, data_dir: Path, quick: bool) -> tuple[str, ...]:
    """The data overrides of a run of `recipe` on its shapes files under `data_dir` (written
    first if missing); quick: tiny files, inputs and batches, no workers."""
    side, files = (QUICK_SIDE, 16) if quick else (recipe.side, recipe.files)
    folder = ensure_shapes(
        data_dir / "shapes", recipe.task, image_size=side, train_images=files, val_images=8
    )
    overrides = (f"data={recipe.data}", f"data.root={folder}", "data.num_classes=8")
    return (*overrides, *recipe.quick, "data.num_workers=0") if quick else overrides


def _plot(panels: Mapping[str, Mapping[str, tuple[float, float]]], path: Path) -> Path:
    """Loader and training-step images/s (each panel's rates, by DataModule), with the loader's
    target (3x the step), one panel per setting."""
    fig, axes = new_figure(len(panels))
    for ax, (title, rates) in zip(axes, panels.items(), strict=True):
        loader, step = ([pair[i] for pair in rates.values()] for i in (0, 1))
        target = [TARGET_LOADER_RATIO * s for s in step]
        bar_chart(
            ax,
            list(rates),
            {
                "training loader": loader,
                "PVT-Tiny training step": step,
                f"target: {TARGET_LOADER_RATIO:g}x the step": target,
            },
            ylabel="images / s",
            title=title,
            log=True,
        )
    return save_figure(fig, path)


_COLUMNS = [
    "DataModule",
    "task",
    "batch",
    "workers",
    "pin memory",
    "persistent workers",
    "loader img/s",
    "step img/s",
    "loader / step",
    "target",
    "verdict",
]


def _loader_row(
    label: str,
    task: str,
    head: str,
    data_dir: Path,
    images: int,
    steps: int,
    data: Sequence[str],
    extra: Sequence[str],
) -> tuple[Any, ...]:
    """A row of `_COLUMNS`, named `label`: the task's training loader for the `data` overrides
    against PVT-Tiny's training step with the task's `head` on the same data."""
    rate, settings = loader_images_per_s(task, data_dir, images, extra, data)
    step = measure_training_step(
        task, head, "pvt_tiny", data_dir, steps=steps, extra=extra, data=data
    ).images_per_s
    ratio = rate / step
    verdict = "met" if ratio >= TARGET_LOADER_RATIO else "missed"
    return (
        label, task, settings["batch"], settings["workers"], settings["pin_memory"],
        settings["persistent"], rate, step, ratio, TARGET_LOADER_RATIO, verdict,
    )  # fmt: skip


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Run the suite; write ``data.md`` and ``data.png`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / ".shapes" if quick else Path(os.environ.get("PVTLAB_DATA", "data"))
    shapes_extra = QUICK_DATA if quick else ()
    images = 16 if quick else 2048  # many rounds of every worker
    real_images = 16 if quick else 1024
    shapes_rows = [
        _loader_row(
            module, task, head, data_dir, images, 1 if quick else 4, SHAPES_DATA, shapes_extra
        )
        for task, head, module in KINDS
    ]
    module_of = {task: module for task, _, module in KINDS}
    real_rows = [
        _loader_row(
            f"{module_of[recipe.task]} (data={recipe.data})", recipe.task, recipe.head, data_dir,
            real_images, 1 if quick else 2, data_overrides(recipe, data_dir, quick), (),
        )
        for recipe in REAL_RECIPES
    ]  # fmt: skip
    command = "python src/bench.py suites=[data]" + (" quick=true" if quick else "")
    step_note = (
        "eager, fp32 (trainer=cpu)."
        if bench_device().type == "cpu"
        else "eager, bf16 autocast on the GPU (trainer=gpu)."
    )
    notes = [
        "Shapes recipes: each task's shapes recipe (64x64 images, its augmentation and batch), "
        f"the real DataModule of the format; {images} images timed after one batch from each "
        "worker (their start-up).",
        "Real recipes: `data=imagenet`, `data=coco` and `data=ade20k` with their recipes "
        "(recipe/<data>_<task>.yaml: DeiT's augmentation at batch 128; shorter side 800 at "
        "batch 2; 0.5-2x resize, 512 crop and photometric distortion at batch 2) on shapes files "
        "in each format, square, "
        + ", ".join(f"{QUICK_SIDE if quick else r.side} px for {r.data}" for r in REAL_RECIPES)
        + f" (ImageNet's and COCO's photos are mostly 500 and 640 px on their longer side; "
        f"ADE20K's recipe scales to a 512 px shorter side); {real_images} images timed, epoch "
        "after epoch, after one batch from each worker.",
        f"Training step: PVT-Tiny with the task's default head, same data and batch, {step_note}",
        "The loader runs alone here; during training it shares the cores with the step.",
    ]
    if quick:
        notes.insert(
            0, "Quick run: tiny data, few batches; figures show the path works, not its speed."
        )
    panels = {
        title: {row[0].split(" ")[0]: (row[6], row[7]) for row in rows}
        for title, rows in (("Shapes recipes", shapes_rows), ("Real recipes", real_rows))
    }
    png = _plot(panels, out_dir / "data.png")
    md = write_report(
        out_dir / "data.md",
        report_header("Data benchmark", command, notes),
        "## Training loaders vs the PVT-Tiny training step: shapes recipes\n\n"
        + markdown_table(_COLUMNS, shapes_rows)
        + "\n## Training loaders vs the PVT-Tiny training step: real recipes\n\n"
        + markdown_table(_COLUMNS, real_rows)
        + f"\n![Loaders vs training step]({png.name})\n",
    )
    return [md, png]
