"""Detector benchmark (paper Table 11 setting): inference latency per image of RetinaNet with
PVT-Small at shorter side 640 and 800 against ResNet50 at 800, and of DETR and Mask R-CNN with
PVT-Small; AP on shapes from the `table11_speed_smoke` sweep when one has been run.

    python src/bench.py suites=[detectors] [quick=true]

Latency: one image (batch 1, eval, no grad, the COCO-sized network: 80 classes, released head
settings), padded to a multiple of 32 by the head; median of repeats after a warm-up.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from pvtlab.bench import markdown_table, report_header, time_call, write_report
from pvtlab.bench.steps import compose_run

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


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def latency_ms(head: str, backbone: str, short_side: int, repeats: int) -> float:
    """Median milliseconds of one image of COCO proportions (short x 1.666 short) through the detector."""
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
        device = _device()
        model = build_model(cfg.backbone, cfg.head, int(cfg.data.num_classes)).eval().to(device)
    image = torch.rand(3, short_side, round(short_side * 1333 / 800), device=device)

    def infer() -> Any:
        with torch.no_grad():
            return model([image])

    return 1000 * time_call(infer, warmup=1, repeats=repeats, device=device)


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


def run(out_dir: Path, quick: bool, log_dir: Path = Path("outputs")) -> list[Path]:
    """Run the suite; write ``detectors.md`` into `out_dir`."""
    out_dir = Path(out_dir)
    plan, repeats = (QUICK, 1) if quick else (FULL, 2)
    threads = torch.get_num_threads()
    if quick:
        torch.set_num_threads(1)
    try:
        latencies = {row: latency_ms(*row[:3], repeats=repeats) for row in plan}
    finally:
        torch.set_num_threads(threads)
    ap = shapes_ap(Path(log_dir))
    rows = [
        (head, backbone, f"{side}x{round(side * 1333 / 800)}", latencies[(head, backbone, side, paper)], paper,
         None if (backbone, side) not in ap or head != "retinanet" else 100 * ap[(backbone, side)])
        for head, backbone, side, paper in plan
    ]  # fmt: skip
    ratio_rows = []
    if not quick:
        pvt640 = latencies[FULL[0]]
        r50 = latencies[FULL[2]]
        ratio_rows = [("RetinaNet PVT-S@640 / ResNet50@800 latency", pvt640 / r50, 51.7 / 55.9)]
    command = "python src/bench.py suites=[detectors]" + (" quick=true" if quick else "")
    notes = [
        f"Device: {_device().type}. Latency: median of {repeats} after 1 warm-up, batch 1, "
        "random image of COCO proportions (shorter x 1.666 shorter), eval, no grad.",
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
            ["head", "backbone", "input", "ms / image", "paper ms (V100)", "AP on shapes (%)"], rows
        ),
    ]
    if ratio_rows:
        sections.append(
            "## Ratio (paper: PVT-S at 640 is faster than ResNet50 at 800)\n\n"
            + markdown_table(["ratio", "pvtlab", "paper"], ratio_rows)
        )
    return [write_report(out_dir / "detectors.md", *sections)]
