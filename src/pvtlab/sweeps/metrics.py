"""Each run's final metrics as ``metrics.json``: what multirun summaries and collate read."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

__all__ = ["METRICS_FILE", "write_metrics"]

METRICS_FILE = "metrics.json"


def write_metrics(metrics: Mapping[str, float], output_dir: Path) -> Path:
    """Write `<output_dir>/metrics.json`; non-finite values become null (JSON has no NaN)."""
    path = Path(output_dir) / METRICS_FILE
    clean = {k: (v if math.isfinite(v) else None) for k, v in sorted(metrics.items())}
    path.write_text(json.dumps(clean, indent=2) + "\n")
    return path
