"""Collate a multirun: one row per job (its swept overrides and final metrics), as a markdown
table and a bar plot of the monitored metric.

    python -m pvtlab.sweeps.collate outputs/experiments/table3_retinanet/<timestamp>
    python src/collate.py <multirun dir> [--out DIR]

A job's metrics come from ``<job>/metrics.json`` (written by the pipeline at the end of a run),
else from the last logged values in ``<job>/metrics.csv``; a job with neither is listed as
without metrics (failed, or still running).
"""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pvtlab.sweeps.metrics import METRICS_FILE

__all__ = ["JobResult", "collate", "main", "markdown_summary", "plot_summary", "read_multirun"]

# Metric suffixes shown in the table, in this order (the paper's figures of each task).
METRIC_ORDER = (
    "acc1",
    "acc5",
    "mAP",
    "mAP_50",
    "mAP_75",
    "mAP_small",
    "mAP_medium",
    "mAP_large",
    "segm_mAP",
    "segm_mAP_50",
    "segm_mAP_75",
    "mIoU",
    "aAcc",
)


@dataclass
class JobResult:
    """One job of a multirun."""

    name: str  # its sub-folder (the job number)
    path: Path
    overrides: list[str]
    metrics: dict[str, float] = field(default_factory=dict)
    monitor: str | None = None  # e.g. val/mAP, from the job's saved config

    @property
    def ok(self) -> bool:
        return bool(self.metrics)


def _read_csv_metrics(path: Path) -> dict[str, float]:
    """Last logged value of every column of a Lightning CSVLogger file."""
    last: dict[str, float] = {}
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and value not in (None, ""):
                    try:
                        last[key] = float(value)
                    except ValueError:
                        continue
    return last


def _read_metrics(job_dir: Path) -> dict[str, float]:
    json_path = job_dir / METRICS_FILE
    if json_path.is_file():
        data = json.loads(json_path.read_text())
        return {k: float(v) for k, v in data.items() if v is not None}
    csv_path = job_dir / "metrics.csv"
    return _read_csv_metrics(csv_path) if csv_path.is_file() else {}


def _read_monitor(job_dir: Path) -> str | None:
    config = job_dir / "config.yaml"
    if not config.is_file():
        return None
    task = (yaml.safe_load(config.read_text()) or {}).get("task") or {}
    return task.get("monitor")


def _job_key(path: Path) -> tuple[int, str]:
    return (int(path.name), "") if path.name.isdigit() else (1 << 30, path.name)


def read_multirun(multirun_dir: str | Path) -> list[JobResult]:
    """Every job folder (one holding ``.hydra/overrides.yaml``) of a multirun, in job order."""
    root = Path(multirun_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such multirun folder")
    jobs = []
    for job_dir in sorted(
        (p.parent.parent for p in root.glob("*/.hydra/overrides.yaml")), key=_job_key
    ):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text()) or []
        jobs.append(
            JobResult(
                name=job_dir.name,
                path=job_dir,
                overrides=[str(o) for o in overrides],
                metrics=_read_metrics(job_dir),
                monitor=_read_monitor(job_dir),
            )
        )
    if not jobs:
        raise FileNotFoundError(
            f"{root} holds no job folders (<job>/.hydra/overrides.yaml): not a Hydra multirun folder"
        )
    return jobs


def _varying_overrides(jobs: Sequence[JobResult]) -> list[str]:
    """Override keys whose value differs between jobs (the swept ones), in first-seen order."""
    values: dict[str, set[str]] = {}
    for job in jobs:
        for override in job.overrides:
            key, _, value = override.partition("=")
            values.setdefault(key, set()).add(value)
    keys = [k for k, v in values.items() if len(v) > 1 or any(k not in _keys(j) for j in jobs)]
    return keys or list(values)[:1]


def _keys(job: JobResult) -> set[str]:
    return {o.partition("=")[0] for o in job.overrides}


def _value(job: JobResult, key: str) -> str:
    for override in job.overrides:
        k, _, v = override.partition("=")
        if k == key:
            return v
    return "-"


def _metric_columns(jobs: Sequence[JobResult]) -> list[str]:
    """`test/<m>` where the jobs have it, else `val/<m>`, for the metrics of METRIC_ORDER."""
    present = set().union(*(j.metrics for j in jobs))
    columns = []
    for suffix in METRIC_ORDER:
        for split in ("test", "val"):
            if f"{split}/{suffix}" in present:
                columns.append(f"{split}/{suffix}")
                break
    return columns


def markdown_summary(jobs: Sequence[JobResult], title: str | None = None) -> str:
    """The jobs as a markdown table: swept overrides, then metrics in percent."""
    keys = _varying_overrides(jobs)
    columns = _metric_columns(jobs)
    header = ["job", *keys, *(f"{c} (%)" for c in columns)]
    lines = [f"# {title}\n" if title else "", "| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for job in jobs:
        cells = [job.name, *(_value(job, k) for k in keys)]
        if job.ok:
            cells += [f"{100 * job.metrics[c]:.1f}" if c in job.metrics else "n/a" for c in columns]
        else:
            cells += ["no metrics (failed or running)", *([""] * (len(columns) - 1))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


def _label(job: JobResult, keys: Sequence[str]) -> str:
    return "\n".join(f"{k.split('.')[-1]}={_value(job, k)}" for k in keys) or job.name


def plot_summary(jobs: Sequence[JobResult], path: str | Path) -> Path | None:
    """A bar per job of its monitored metric (test split when measured); None without metrics."""
    monitors = [j.monitor for j in jobs if j.monitor]
    # The metric most jobs monitor (a pre-train-then-fine-tune sweep mixes tasks), later jobs winning ties.
    monitor = max(reversed(monitors), key=monitors.count) if monitors else None
    names = _metric_columns(jobs)
    if monitor is not None:
        suffix = monitor.split("/", 1)[-1]
        names = [n for n in names if n.endswith(f"/{suffix}")] or names
    if not names:
        return None
    metric = names[0]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = _varying_overrides(jobs)
    labels = [_label(j, keys) for j in jobs]
    values = [100 * j.metrics.get(metric, float("nan")) for j in jobs]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(jobs)), 3.8))
    bars = ax.bar(range(len(jobs)), values, color="#4c72b0")
    ax.bar_label(bars, fmt="%.1f")
    ax.set_xticks(range(len(jobs)), labels, fontsize=8)
    ax.set_ylabel(f"{metric} (%)")
    ax.set_title(Path(path).parent.name)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def collate(multirun_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``summary.md`` (and ``summary.png`` when there are metrics) for a multirun."""
    root = Path(multirun_dir)
    jobs = read_multirun(root)
    out = Path(out_dir) if out_dir is not None else root
    out.mkdir(parents=True, exist_ok=True)
    md = out / "summary.md"
    md.write_text(markdown_summary(jobs, title=f"Multirun {root}"))
    written = [md]
    png = plot_summary(jobs, out / "summary.png")
    if png is not None:
        written.append(png)
        md.write_text(md.read_text() + f"\n![monitored metric per job]({png.name})\n")
    return written


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "multirun_dir", type=Path, help="a Hydra multirun folder (holds 0/, 1/, ...)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write (default: multirun_dir)"
    )
    args = parser.parse_args(argv)
    for path in collate(args.multirun_dir, args.out):
        print(path)
    print((Path(args.out or args.multirun_dir) / "summary.md").read_text())


if __name__ == "__main__":
    main()
