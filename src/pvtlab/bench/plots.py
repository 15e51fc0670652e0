"""Figures of the benchmark reports: one style for every suite, drawn off-screen (Agg), so
that a report's plot shows the same figures as its tables, from the same run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bar_chart", "new_figure", "save_figure"]

Value = float | str | None  # a table cell: a figure, a failure message, or missing


def new_figure(
    panels: int = 1, panel_size: tuple[float, float] = (5.5, 4.0)
) -> tuple[Any, list[Any]]:
    """A matplotlib figure with `panels` side-by-side axes, on the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width, height = panel_size
    fig, axes = plt.subplots(1, panels, figsize=(width * panels, height), squeeze=False)
    return fig, list(axes[0])


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG to `path` and release it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _number(value: Value) -> float:
    """A bar's height: NaN (no bar) for a missing or failed measurement."""
    return float(value) if isinstance(value, int | float) else float("nan")


def bar_chart(
    ax: Any,
    groups: Sequence[str],
    series: Mapping[str, Sequence[Value]],
    *,
    ylabel: str,
    title: str,
    log: bool = False,
    reference: tuple[float, str] | None = None,
) -> None:
    """Grouped bars on `ax`: one group per entry of `groups`, one bar per series in each.
    Missing or failed values (None, a message) leave a gap. `reference`: (value, label) of a
    dashed horizontal line, such as a target ratio."""
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for i, (label, values) in enumerate(series.items()):
        if len(values) != len(groups):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(groups)} groups")
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar(x + offset, [_number(v) for v in values], width, label=label)
    if reference is not None:
        value, label = reference
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
    ax.set_xticks(x, groups, rotation=20, ha="right")
    if log:
        ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    # headroom above the tallest bar, where the legend goes rather than over a bar
    bottom, top = ax.get_ylim()
    ax.set_ylim(bottom, top * 4 if log else top * 1.35)
    ax.legend(fontsize="small", loc="upper right")
