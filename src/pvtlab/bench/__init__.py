"""Benchmark suites (`python src/bench.py`) and the helpers they share: timing, peak memory,
and markdown reports that say on what machine, with which versions and command they were made."""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "PEAK_MEMORY_ENV",
    "PeakMemory",
    "bench_device",
    "failure",
    "machine_info",
    "mark_start",
    "markdown_table",
    "report_header",
    "run_worker",
    "synchronize",
    "time_call",
    "time_interleaved",
    "write_report",
]

K = TypeVar("K", bound=Hashable)


def bench_device() -> torch.device:
    """Where the suites run their models: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def failure(error: Exception) -> str:
    """A table cell for a measurement that raised: a path that fails is a finding of the
    benchmark, not the end of its run."""
    return f"failed: {type(error).__name__}: {str(error)[:80]}"


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for queued GPU work (a no-op on CPU), so wall-clock timings cover it."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(
    fn: Callable[[], Any],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> float:
    """Median wall-clock seconds of `fn()` over `repeats` runs after `warmup` untimed runs."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(max(repeats, 1)):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_interleaved(
    fns: Mapping[K, Callable[[], Any]],
    *,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | str | None = None,
) -> dict[K, float]:
    """Median wall-clock seconds of each of `fns`, timed in turns (a, b, c, a, b, c, ...) after
    `warmup` untimed runs of each, so that a machine whose speed drifts during the measurement
    (load, clocks) shifts every path alike and their ratios stay meaningful."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[K, list[float]] = {key: [] for key in fns}
    for _ in range(max(repeats, 1)):
        for key, fn in fns.items():
            times[key].append(time_call(fn, warmup=0, repeats=1, device=device))
    return {key: statistics.median(values) for key, values in times.items()}


def run_worker(module: str, request: Mapping[str, Any], env: Mapping[str, str]) -> Any:
    """Run ``python -m <module> <request as JSON>`` in a fresh interpreter with environment
    `env`; return the JSON its last stdout line holds (a failure raises with its stderr)."""
    proc = subprocess.run(
        [sys.executable, "-m", module, json.dumps(request)],
        env=dict(env),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{module} worker failed for {request}:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# The environment of a process that measures CPU peak memory (`PeakMemory`): glibc's mmap
# threshold fixed at 128 KiB, so that freed tensors leave the resident set.
PEAK_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def _proc_status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class PeakMemory:
    """Peak memory a block of code adds, in MiB (``with PeakMemory(device) as pm: ...; pm.mib``).

    CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated on entry (tensors only).
    CPU (Linux): the process's resident-set high-water mark (``VmHWM``, reset on entry through
    ``/proc/self/clear_refs``) above the resident set on entry. This counts every byte the
    process touched, allocator retention included; run it in a fresh process with
    ``MALLOC_MMAP_THRESHOLD_`` fixed (see ``pvtlab.bench.backbones``) so freed tensors go back
    to the system. ``mib`` is None where neither is available.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.mib: float | None = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
                self._base = _proc_status_kib("VmRSS") or -1
            except OSError:
                self._base = -1
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            self.mib = (peak - self._base) / 2**20
        elif self._base >= 0:
            hwm = _proc_status_kib("VmHWM")
            self.mib = None if hwm is None else max(hwm - self._base, 0) / 1024


_start: dict[str, str] = {}


def mark_start() -> None:
    """Note the time and load average now, as the start of the suite about to run: reports are
    written at its end, when the suite's own threads are part of the load."""
    _start.update(_now_and_load())


def _now_and_load() -> dict[str, str]:
    return {
        "date": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        # other work on a shared machine slows every figure: say how busy it was
        "load average at start (1/5/15 min)": (
            " / ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
        ),
    }


def machine_info() -> dict[str, str]:
    """Where a benchmark ran: CPU, GPU, threads and library versions; the date and load average
    are those of :func:`mark_start` when the runner called it, else of now."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    start = _start or _now_and_load()
    return {
        "date": start["date"],
        "machine": f"{platform.system()} {platform.machine()}, {cpu}",
        "cpu cores": f"{os.cpu_count()} (torch threads: {torch.get_num_threads()})",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "load average at start (1/5/15 min)": start["load average at start (1/5/15 min)"],
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "timm": timm.__version__,
    }


def report_header(title: str, command: str, notes: Sequence[str] = ()) -> str:
    """Markdown title, then machine, versions and the command that produced the report."""
    lines = [f"# {title}", "", f"Command: `{command}`", ""]
    lines += [f"- {k}: {v}" for k, v in machine_info().items()]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats to 3 significant digits, None as n/a."""
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(out) + "\n"


def write_report(path: str | os.PathLike[str], *sections: str) -> Path:
    """Write markdown sections (separated by blank lines) to `path`, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(s.rstrip("\n") + "\n" for s in sections))
    return path
