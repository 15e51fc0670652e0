"""Run benchmark suites by name. Each suite is a module `pvtlab.bench.<name>` with
`run(out_dir: Path, quick: bool) -> list[Path]` that writes its tables and plots; on a GPU they
go to `<out_dir>/gpu/`, beside the CPU figures rather than over them."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from pathlib import Path

from pvtlab.bench import bench_device, mark_start
from pvtlab.utils.numerics import use_fast_float32_matmuls

log = logging.getLogger(__name__)

SUITES = ("backbones", "detectors", "training", "data")


def run_suites(names: Sequence[str], out_dir: str | Path, quick: bool = False) -> list[Path]:
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ValueError(f"unknown benchmark suite(s) {unknown}; choose from {list(SUITES)}")
    out_dir = Path(out_dir) / ("gpu" if bench_device().type == "cuda" else "")
    out_dir.mkdir(parents=True, exist_ok=True)
    use_fast_float32_matmuls()  # as src/train.py and src/eval.py run
    written: list[Path] = []
    for name in names:
        log.info("benchmark suite %s (quick=%s)", name, quick)
        suite = importlib.import_module(f"pvtlab.bench.{name}")
        mark_start()
        written += suite.run(out_dir, quick)
    for path in written:
        log.info("wrote %s", path)
    return written
