"""Data benchmark: images per second of each DataModule's training loader (the shapes data in
its real on-disk formats) against the rate PVT-Tiny's training step consumes them.

    python src/bench.py suites=[data] [quick=true]

Target (issue 10, reported as a ratio, never asserted): every training loader delivers at least
3x the images per second of the PVT-Tiny training step of its task.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hydra.utils import instantiate

from pvtlab.bench import bench_device, markdown_table, report_header, write_report
from pvtlab.bench.plots import bar_chart, new_figure, save_figure
from pvtlab.bench.steps import QUICK_DATA, compose_run, measure_training_step

__all__ = ["count_images", "loader_images_per_s", "run"]

TARGET_LOADER_RATIO = 3.0
KINDS = (
    ("classification", "linear", "ImageFolderDataModule"),
    ("detection", "retinanet", "CocoDataModule"),
    ("segmentation", "semantic_fpn", "ADE20KDataModule"),
)


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
    task: str, data_dir: Path, images: int, extra: tuple[str, ...] = ()
) -> tuple[float, dict[str, Any]]:
    """Images per second of the task's shapes training loader over `images` images (or the rest
    of the epoch, if shorter), and the loader's settings. Untimed first: one batch from each
    worker, which carries that worker's start-up."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(
            [
                f"task={task}",
                "data=shapes",
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
        for i, batch in enumerate(loader):
            if i < warmup:
                start = time.perf_counter()
                continue
            seen += count_images(batch)
            if seen >= images:
                break
        seconds = time.perf_counter() - start
    return (seen / seconds if seconds > 0 and seen else float("nan")), settings


def _plot(rates: Mapping[str, tuple[float, float]], path: Path) -> Path:
    """Loader and training-step images/s (`rates`, by DataModule), with the loader's target
    (3x the step)."""
    loader, step = ([pair[i] for pair in rates.values()] for i in (0, 1))
    fig, (ax,) = new_figure()
    bar_chart(
        ax,
        list(rates),
        {
            "training loader": loader,
            "PVT-Tiny training step": step,
            f"target: {TARGET_LOADER_RATIO:g}x the step": [TARGET_LOADER_RATIO * s for s in step],
        },
        ylabel="images / s",
        title="Training loaders vs the step they feed",
        log=True,
    )
    return save_figure(fig, path)


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Run the suite; write ``data.md`` and ``data.png`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / ".shapes" if quick else Path(os.environ.get("PVTLAB_DATA", "data"))
    extra = QUICK_DATA if quick else ()
    images = 16 if quick else 2048  # many rounds of every worker
    rows, rates = [], {}
    for task, head, module in KINDS:
        rate, settings = loader_images_per_s(task, data_dir, images, extra)
        step = measure_training_step(
            task, head, "pvt_tiny", data_dir, steps=1 if quick else 4, extra=extra
        )
        rates[module] = (rate, step.images_per_s)
        ratio = rate / step.images_per_s
        verdict = "met" if ratio >= TARGET_LOADER_RATIO else "missed"
        rows.append(
            (module, task, settings["batch"], settings["workers"], settings["pin_memory"],
             settings["persistent"], rate, step.images_per_s, ratio, TARGET_LOADER_RATIO, verdict)
        )  # fmt: skip
    command = "python src/bench.py suites=[data]" + (" quick=true" if quick else "")
    notes = [
        f"Loaders: each task's shapes recipe (64x64 images, its augmentation and batch), the real "
        f"DataModule of the format; {images} images timed (or the epoch, if shorter) after one "
        "batch from each worker (their start-up).",
        "Training step: PVT-Tiny with the task's default head, same data and batch, eager, "
        + (
            "fp32 (trainer=cpu)."
            if bench_device().type == "cpu"
            else "bf16 autocast on the GPU (trainer=gpu)."
        ),
        "The loader runs alone here; during training it shares the cores with the step.",
    ]
    if quick:
        notes.insert(
            0, "Quick run: tiny data, few batches; figures show the path works, not its speed."
        )
    png = _plot(rates, out_dir / "data.png")
    md = write_report(
        out_dir / "data.md",
        report_header("Data benchmark", command, notes),
        "## Training loaders vs the PVT-Tiny training step\n\n"
        + markdown_table(
            [
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
            ],
            rows,
        )
        + f"\n![Loaders vs training step]({png.name})\n",
    )
    return [md, png]
