"""Detector benchmark (paper Table 11 setting): inference latency per image of RetinaNet with
PVT-Small at shorter side 640 and 800 against ResNet50 at 800, and of DETR and Mask R-CNN with
PVT-Small; AP on shapes from the `table11_speed_smoke` sweep when one has been run; and the time
COCO evaluation takes (`pvtlab.bench.evaluation`) and Mask R-CNN's RoIAlign backward on the CPU
(`pvtlab.bench.roi_align`).

    python src/bench.py suites=[detectors] [quick=true]

Latency: one image (batch 1, eval, no grad, the COCO-sized network: 80 classes, released head
settings), padded to a multiple of 32 by the head; median of repeats after warm-ups; fp32 (TF32
matrix products on a GPU, as `src/eval.py` runs) and bf16 autocast.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Any

import torch

from pvtlab.bench import (
    bench_device,
    failure,
    markdown_table,
    report_header,
    time_interleaved,
    write_report,
)
from pvtlab.bench.attention import attention_precision
from pvtlab.bench.evaluation import evaluation_section, evaluation_times
from pvtlab.bench.plots import bar_chart, new_figure, save_figure
from pvtlab.bench.roi_align import roi_align_backward_times, roi_align_section
from pvtlab.bench.steps import compose_run
from pvtlab.models.attention import cpu_explicit_attention_max_scores

__all__ = ["latency_ms", "run", "shapes_ap"]

# (head, backbone, shorter side, paper's V100 latency in ms)
FULL = (
    ("retinanet", "pvt_small", 640, 51.7),
    ("retinanet", "pvt_small", 800, None),
    ("retinanet", "resnet50", 800, 55.9),
    ("detr", "pvt_small", 800, None),
    ("mask_rcnn", "pvt_small", 800, None),
)
QUICK = (
    ("retinanet", "pvt_tiny", 48, None),
    ("retinanet", "resnet18", 64, None),
    ("detr", "pvt_tiny", 64, None),
    ("mask_rcnn", "pvt_tiny", 64, None),
)
SHAPES_SIDE = {640: 48, 800: 64}  # table11_speed_smoke's stand-ins for the COCO sizes


PRECISIONS = ("fp32", "bf16")
# bf16 with SDPA for every attention call: what pvtlab's choice of attention kernel gains
SDPA_ONLY = "bf16, SDPA throughout"
# Each timed path: (bf16 autocast, SDPA only)
PATHS = {"fp32": (False, False), "bf16": (True, False), SDPA_ONLY: (True, True)}


def latency_ms(
    head: str, backbone: str, short_side: int, repeats: int, warmup: int = 1
) -> dict[str, float]:
    """Median milliseconds of one image of COCO proportions (short x 1.666 short) through the
    detector along each of `PATHS` (fp32; bf16 autocast; bf16 with SDPA throughout), timed in
    turns."""
    from pvtlab.pipeline import build_model

    with tempfile.TemporaryDirectory() as tmp:
        cfg = compose_run(
            [
                "task=detection",
                f"head={head}",
                f"backbone={backbone}",
                "data=coco",
                f"paths.log_dir={tmp}",
            ],
            Path(tmp) / "run",
        )
        torch.manual_seed(0)
        device = bench_device()
        model = build_model(cfg.backbone, cfg.head, int(cfg.data.num_classes)).eval().to(device)
    image = torch.rand(3, short_side, round(short_side * 1333 / 800), device=device)

    def infer(bf16: bool, sdpa_only: bool) -> Any:
        with torch.no_grad(), attention_precision(device, bf16, sdpa_only):
            return model([image])

    seconds = time_interleaved(
        {label: lambda path=path: infer(*path) for label, path in PATHS.items()},
        warmup=warmup,
        repeats=repeats,
        device=device,
    )
    return {p: 1000 * s for p, s in seconds.items()}


def shapes_ap(log_dir: Path) -> dict[tuple[str, int], float]:
    """test/mAP on shapes by (backbone, COCO-equivalent side), from every job of every
    `table11_speed_smoke` sweep under `log_dir` (the newest sweep wins where two ran the same
    job), so that its four jobs may also be run one at a time, or a stopped sweep count."""
    from pvtlab.experiments.collate import read_multirun

    coco_side = {v: k for k, v in SHAPES_SIDE.items()}
    found = {}
    for sweep in sorted((log_dir / "experiments" / "table11_speed_smoke").glob("*/")):
        try:
            jobs = read_multirun(sweep)
        except FileNotFoundError:  # a sweep stopped before its first job started
            continue
        for job in jobs:
            values = dict(o.split("=", 1) for o in job.overrides if "=" in o)
            side = coco_side.get(int(values.get("data.test_short_side", -1)))
            if side and "test/mAP" in job.metrics:
                found[(values.get("backbone", ""), side)] = job.metrics["test/mAP"]
    return found


def _plot(
    plan: tuple[tuple[Any, ...], ...],
    latencies: dict[tuple[Any, ...], dict[str, float] | str],
    ap: dict[tuple[str, int], float],
    path: Path,
) -> Path:
    """Latency per detector in each precision; beside it, where the table11_speed_smoke sweep
    gave AP, RetinaNet's AP on shapes against its fp32 latency (the trade-off of Table 11)."""
    retinanet_ap = []
    for row in plan:
        head, backbone, side, _ = row
        ms = latencies[row]
        if head == "retinanet" and (backbone, side) in ap and isinstance(ms, dict):
            retinanet_ap.append((f"{backbone}@{side}", ms["fp32"], 100 * ap[(backbone, side)]))
    fig, axes = new_figure(panels=2 if retinanet_ap else 1)
    labels = [f"{head} {backbone}@{side}" for head, backbone, side, _ in plan]
    cells = [latencies[row] for row in plan]  # a dict by precision, or a failure message
    bar_chart(
        axes[0],
        labels,
        {p: [ms[p] if isinstance(ms, dict) else ms for ms in cells] for p in PRECISIONS},
        ylabel="ms / image (batch 1)",
        title="Detector latency",
    )
    if retinanet_ap:
        ax = axes[1]
        for label, ms, value in retinanet_ap:
            ax.scatter(ms, value)
            ax.annotate(label, (ms, value), textcoords="offset points", xytext=(4, 4))
        ax.set_xlabel("ms / image, fp32 (COCO-sized input)")
        ax.set_ylabel("test AP on shapes (%)")
        ax.set_title("RetinaNet: AP vs latency (Table 11)")
        ax.margins(0.2)  # room for the labels right of the points
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def run(out_dir: Path, quick: bool, log_dir: Path = Path("outputs")) -> list[Path]:
    """Run the suite; write ``detectors.md`` and ``detectors.png`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = bench_device()
    plan = QUICK if quick else FULL
    # a GPU runs an image in tens of milliseconds: more repeats steady the median
    repeats, warmup = (1, 1) if quick else (2, 1) if device.type == "cpu" else (20, 3)
    threads = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    # as `trainer=gpu` runs: cuDNN picks its fastest convolutions for each input size
    benchmark, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, True
    latencies: dict[tuple[Any, ...], dict[str, float] | str] = {}
    try:
        for row in plan:
            try:
                latencies[row] = latency_ms(*row[:3], repeats=repeats, warmup=warmup)
            except Exception as error:
                latencies[row] = failure(error)
    finally:
        torch.set_num_threads(threads)
        torch.backends.cudnn.benchmark = benchmark
    ap = shapes_ap(Path(log_dir))
    rows = []
    for row in plan:
        head, backbone, side, paper = row
        ms = latencies[row]
        timings = (
            (ms, None, None, None, None)
            if isinstance(ms, str)
            else (
                ms["fp32"], ms["bf16"], ms["fp32"] / ms["bf16"],
                ms[SDPA_ONLY], ms[SDPA_ONLY] / ms["bf16"],
            )
        )  # fmt: skip
        shapes = ap.get((backbone, side)) if head == "retinanet" else None
        rows.append(
            (head, backbone, f"{side}x{round(side * 1333 / 800)}", *timings, paper,
             None if shapes is None else 100 * shapes)
        )  # fmt: skip
    ratio_rows = []
    pvt640, r50 = latencies.get(FULL[0]), latencies.get(FULL[2])
    if not quick and isinstance(pvt640, dict) and isinstance(r50, dict):
        ratio_rows = [
            (f"RetinaNet PVT-S@640 / ResNet50@800 latency, {p}", pvt640[p] / r50[p], 51.7 / 55.9)
            for p in PRECISIONS
        ]
    command = "python src/bench.py suites=[detectors]" + (" quick=true" if quick else "")
    notes = [
        f"Device: {device.type}. Latency: median of {repeats} after {warmup} warm-up(s), "
        "batch 1, random image of COCO proportions (shorter x 1.666 shorter), eval, no grad; "
        "fp32, bf16 autocast and bf16 with SDPA for every attention call timed in turns "
        "(the last against pvtlab's choice of attention kernel, `pvtlab.models.attention`: the "
        "explicit softmax product on the CPU in bf16 up to "
        f"2^{math.log2(cpu_explicit_attention_max_scores()):.1f} scores a call in this run)"
        + (
            ", fp32 matrix products in TF32 (as src/eval.py runs), cuDNN benchmark mode."
            if device.type == "cuda"
            else "."
        ),
        "AP: test/mAP (%) on shapes of the newest `python src/train.py -m experiment=table11_speed_smoke` "
        "sweep (shorter sides 48 / 64 stand for 640 / 800); n/a where none has been run. "
        "The paper's ms are on one V100: compare ratios, not absolute times.",
    ]
    if quick:
        notes.insert(0, "Quick run: tiny backbones and images, one thread; shows the path works.")
    sections = [
        report_header("Detector benchmark (paper Table 11)", command, notes),
        "## Latency per image\n\n"
        + markdown_table(
            [
                "head",
                "backbone",
                "input",
                "ms / image fp32",
                "ms / image bf16",
                "bf16 speed-up",
                "ms / image bf16, SDPA throughout",
                "attention choice speed-up",
                "paper ms (V100, fp32)",
                "AP on shapes (%)",
            ],
            rows,
        ),
    ]
    if ratio_rows:
        sections.append(
            "## Ratio (paper: PVT-S at 640 is faster than ResNet50 at 800)\n\n"
            + markdown_table(["ratio", "pvtlab", "paper"], ratio_rows)
        )
    sections.append(evaluation_section(evaluation_times(quick)))
    sections.append(roi_align_section(roi_align_backward_times(quick)))
    png = _plot(plan, latencies, ap, out_dir / "detectors.png")
    sections.append(f"![Detector latency and AP]({png.name})\n")
    return [write_report(out_dir / "detectors.md", *sections), png]
