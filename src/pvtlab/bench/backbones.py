"""Backbone benchmark: throughput and peak memory (fused vs explicit-softmax attention), and
GMACs against input size (paper Figure 6).

    python src/bench.py suites=[backbones] [quick=true]

Throughput: images per second, forward (eval, no grad) and forward + backward (train mode, the
mean of the outputs as loss); median of repeats after a warm-up. 224 x 224 at batch 32 runs the
classifiers; 800 x 1333 at batch 1 runs the ``features_only`` backbones (detection inputs), on a
GPU also in bf16 autocast at batch 1 and 2 (mmdetection's images per GPU), the precision
`trainer=gpu` trains in.
Peak memory: see :class:`pvtlab.bench.PeakMemory`; in the full run every configuration is
measured in its own process with glibc's mmap threshold fixed at 128 KiB, so freed tensors leave
the resident set and its high-water mark is the peak the pass needs above the model and inputs;
its timings come from a second process with the allocator setting of `src/train.py`
(:func:`pvtlab.utils.allocator.reuse_freed_memory`).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from pvtlab.bench import (
    PEAK_MEMORY_ENV,
    PeakMemory,
    bench_device,
    markdown_table,
    report_header,
    run_worker,
    time_interleaved,
    write_report,
)
from pvtlab.bench.plots import new_figure, save_figure
from pvtlab.utils.allocator import reuse_freed_memory
from pvtlab.utils.numerics import use_fast_float32_matmuls

__all__ = ["Config", "measure", "run", "time_in_fresh_process"]

PVT = ("pvt_tiny", "pvt_small", "pvt_medium", "pvt_large")
BASELINES = ("resnet50", "vit_small_32")
GMACS_MODELS = {"PVT-Small": "pvt_small", "ResNet50": "resnet50", "ViT-Small/16": "vit_small_16"}


@dataclass(frozen=True)
class Config:
    name: str
    height: int
    width: int
    batch: int
    features_only: bool
    repeats_fwd: int = 3  # timed forward runs per attention path (the median is reported)
    repeats_bwd: int = 1
    warmup_fwd: int = 1  # untimed forward runs per path before timing
    # Untimed forward + backward runs per path before timing: a process that keeps freed memory
    # pays its page faults in the first pass only, which would fall on whichever path goes first.
    warmup_bwd: int = 1
    precision: str = "fp32"  # or "bf16": the passes under bf16 autocast

    @property
    def variants(self) -> tuple[bool, ...]:
        """Attention paths to compare: fused then reference for PVT, none for baselines."""
        return (True, False) if self.name.startswith("pvt") else (True,)


def attention_label(name: str, fused: bool) -> str:
    if not name.startswith("pvt"):
        return "-"
    return "fused (SDPA)" if fused else "reference (softmax)"


def measure(cfg: Config, *, memory: bool = True, timing: bool = True) -> list[dict[str, Any]]:
    """Measure one configuration in this process, one result per attention path.

    Memory is measured path by path, fused first (so whatever the allocator kept from it could
    only flatter the reference), one run each. Timings alternate between the paths, so a machine
    whose load drifts during the run slows both alike; the first timed forward of each path is
    preceded by `cfg.warmup_fwd` (`cfg.warmup_bwd`) untimed ones unless the memory runs came
    first.
    """
    from pvtlab.models import create_backbone

    device = bench_device()
    torch.manual_seed(0)
    model = create_backbone(cfg.name, features_only=cfg.features_only).to(device)
    net = getattr(model, "model", model)
    x = torch.randn(cfg.batch, 3, cfg.height, cfg.width, device=device)

    def select(fused: bool) -> None:
        if cfg.name.startswith("pvt"):
            net.fused_attn = fused

    def outputs() -> list[torch.Tensor]:
        out = model(x)
        return out if isinstance(out, list | tuple) else [out]

    def autocast() -> torch.autocast:
        return torch.autocast(device.type, torch.bfloat16, enabled=cfg.precision == "bf16")

    def forward() -> None:
        with torch.no_grad(), autocast():
            outputs()

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with autocast():
            loss = sum(o.float().mean() for o in outputs())
        loss.backward()

    results = {fused: {"fused": fused} for fused in cfg.variants}
    for mode, fn, repeats, warmup in (
        ("fwd", forward, cfg.repeats_fwd, cfg.warmup_fwd),
        ("fwdbwd", forward_backward, cfg.repeats_bwd, cfg.warmup_bwd),
    ):
        model.train(mode == "fwdbwd")
        with torch.no_grad():  # runtime start-up (thread pools, kernels) before measuring
            model(torch.randn(1, 3, 64, 64, device=device))
        if memory:
            for fused in cfg.variants:
                select(fused)
                with PeakMemory(device) as peak:
                    fn()
                model.zero_grad(set_to_none=True)
                results[fused][f"{mode}_peak_mib"] = peak.mib
        if not timing:
            continue

        def on_path(fused: bool, fn: Callable[[], None] = fn) -> Callable[[], None]:
            return lambda: (select(fused), fn())

        seconds = time_interleaved(
            {fused: on_path(fused) for fused in cfg.variants},
            warmup=0 if memory else warmup,
            repeats=repeats,
            device=device,
        )
        model.zero_grad(set_to_none=True)
        for fused in cfg.variants:
            results[fused][f"{mode}_img_s"] = cfg.batch / seconds[fused]
    return list(results.values())


def _measure_in_subprocess(cfg: Config) -> list[dict[str, Any]]:
    """Memory and timings of `cfg`, each measured in a fresh process of its own.

    The memory process fixes glibc's mmap threshold at 128 KiB so freed tensors leave the
    resident set (see :class:`pvtlab.bench.PeakMemory`); the timing process keeps freed memory
    for reuse, as training does: with the threshold fixed every large tensor is a fresh mmap
    whose pages fault in on each pass.
    """
    memory = _run_worker(cfg, memory=True, env=PEAK_MEMORY_ENV)
    timing = time_in_fresh_process(cfg)
    return [{**m, **t} for m, t in zip(memory, timing, strict=True)]


def time_in_fresh_process(cfg: Config, reuse_freed_memory: bool = True) -> list[dict[str, Any]]:
    """Timings of `cfg` (`measure(cfg, memory=False)`) in a new interpreter, with the host
    allocator as `src/train.py` sets it (`reuse_freed_memory`) or as glibc has it."""
    return _run_worker(cfg, timing=True, reuse=reuse_freed_memory, env={})


def _run_worker(cfg: Config, env: dict[str, str], **what: bool) -> list[dict[str, Any]]:
    request = {"config": asdict(cfg), "memory": False, "timing": False, "reuse": False, **what}
    return run_worker("pvtlab.bench.backbones", request, {**os.environ, **env})


def _plan(quick: bool, device: torch.device) -> list[Config]:
    if quick:  # bf16 too, so that the tests run its code path
        settings = [
            (32, 32, 2, False, "fp32"),
            (64, 96, 1, True, "fp32"),
            (64, 96, 1, True, "bf16"),
        ]
        names = ("pvt_tiny", *BASELINES)
        reps = dict(repeats_fwd=1, repeats_bwd=1)
    else:
        settings = [(224, 224, 32, False, "fp32"), (800, 1333, 1, True, "fp32")]
        names = (*PVT, *BASELINES)
        if device.type == "cpu":
            reps = dict(repeats_fwd=3, repeats_bwd=1, warmup_fwd=1)
        else:  # milliseconds a pass: more repeats cost little and steady the median
            reps = dict(repeats_fwd=20, repeats_bwd=10, warmup_fwd=3, warmup_bwd=3)
            # Detection as trained on a GPU: bf16 (flash attention), 1 and 2 images
            settings += [(800, 1333, 1, True, "bf16"), (800, 1333, 2, True, "bf16")]
    return [
        Config(name, h, w, batch, features_only, precision=precision, **reps)
        for h, w, batch, features_only, precision in settings
        for name in names
    ]


def _gmacs_table(sizes: list[int]) -> dict[str, list[float]]:
    from pvtlab.models import count_gmacs, create_backbone

    table = {}
    for label, name in GMACS_MODELS.items():
        with torch.device("meta"):  # counting needs shapes only
            model = create_backbone(name, features_only=False)
        table[label] = [count_gmacs(model, (s, s)) for s in sizes]
    return table


def _plot(sizes: list[int], gmacs: dict[str, list[float]], path: Path) -> Path:
    fig, (ax,) = new_figure()
    for (label, values), marker in zip(gmacs.items(), "os^", strict=False):
        ax.plot(sizes, values, marker=marker, label=label)
    ax.set_xlabel("input size (square, pixels)")
    ax.set_ylabel("GMACs")
    ax.set_title("Compute vs input scale (paper Figure 6)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Run the suite; write ``backbones.md`` and ``backbones.png`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = bench_device()
    plan = _plan(quick, device)
    if quick:  # tiny inputs gain nothing from threads, and a busy machine makes them spin
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            results = {cfg: measure(cfg) for cfg in plan}
        finally:
            torch.set_num_threads(threads)
    elif device.type == "cuda":  # CUDA's peak counter is per tensor: one process serves all
        results = {cfg: measure(cfg) for cfg in plan}
    else:
        results = {cfg: _measure_in_subprocess(cfg) for cfg in plan}

    rows = [
        (
            cfg.name,
            f"{cfg.height}x{cfg.width}",
            cfg.batch,
            "features" if cfg.features_only else "classifier",
            cfg.precision,
            attention_label(cfg.name, r["fused"]),
            r["fwd_img_s"],
            r["fwdbwd_img_s"],
            r["fwd_peak_mib"],
            r["fwdbwd_peak_mib"],
        )
        for cfg, variants in results.items()
        for r in variants
    ]
    throughput = markdown_table(
        [
            "model",
            "input",
            "batch",
            "output",
            "precision",
            "attention",
            "fwd img/s",
            "fwd+bwd img/s",
            "fwd peak MiB",
            "fwd+bwd peak MiB",
        ],
        rows,
    )

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    compare_rows = []
    for cfg, variants in results.items():
        if len(variants) != 2:
            continue
        fused, ref = variants
        compare_rows.append(
            (
                cfg.name,
                f"{cfg.height}x{cfg.width} x{cfg.batch} {cfg.precision}",
                ratio(fused["fwd_img_s"], ref["fwd_img_s"]),
                ratio(fused["fwdbwd_img_s"], ref["fwdbwd_img_s"]),
                fused["fwd_peak_mib"],
                ref["fwd_peak_mib"],
                fused["fwdbwd_peak_mib"],
                ref["fwdbwd_peak_mib"],
            )
        )
    comparison = markdown_table(
        [
            "model",
            "input",
            "fwd speed-up",
            "fwd+bwd speed-up",
            "fwd peak fused",
            "fwd peak reference",
            "fwd+bwd peak fused",
            "fwd+bwd peak reference",
        ],
        compare_rows,
    )

    sizes = [224, 320] if quick else [224, 320, 416, 512, 640, 768, 896, 1024]
    gmacs = _gmacs_table(sizes)
    gmacs_rows = [(s, *(gmacs[label][i] for label in gmacs)) for i, s in enumerate(sizes)]
    gmacs_md = markdown_table(["input", *gmacs], gmacs_rows)
    png = _plot(sizes, gmacs, out_dir / "backbones.png")

    command = "python src/bench.py suites=[backbones]" + (" quick=true" if quick else "")
    if os.environ.get("OMP_NUM_THREADS"):
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    repeats = (
        f"Timed runs per figure: forward {plan[0].repeats_fwd} (median) after "
        f"{plan[0].warmup_fwd} untimed, forward+backward {plan[0].repeats_bwd} after "
        f"{plan[0].warmup_bwd} untimed; start-up excluded by a small run before. "
    )
    if quick:
        how = "Quick run: tiny sizes, one repeat, one thread, all in one process (memory figures rough)."
    elif device.type == "cuda":
        how = repeats + "All in this process (CUDA counts peak memory per tensor; fused first)."
    else:
        how = repeats + (
            "Each model and size is measured in two fresh processes: one for memory (fused "
            "first), one for timings (freed memory reused, as `src/train.py` runs; fused and "
            "reference alternating)."
        )
    notes = [
        f"Device: {device.type}. {how}",
        "Peak memory: MiB the pass adds above the model and inputs "
        + (
            "(torch.cuda.max_memory_allocated)."
            if device.type == "cuda"
            else "(resident-set high-water mark, glibc mmap threshold 128 KiB; see "
            "pvtlab.bench.PeakMemory)."
        ),
        "Attention: `fused` is pvtlab's attention as the models run it "
        "(`pvtlab.models.attention.attention`: torch's scaled_dot_product_attention, on the CPU "
        "in bf16 the explicit product where that is faster; in the forward + backward with the "
        "queries folded into the batch where the backward would be short of work), "
        "`reference` the explicit softmax(QK^T)V of the release (same weights, same model).",
    ]
    md = write_report(
        out_dir / "backbones.md",
        report_header("Backbone benchmark", command, notes),
        "## Throughput and peak memory\n\n" + throughput,
        "## PVT: fused vs reference attention (ratios > 1: fused faster; memory in MiB)\n\n"
        + comparison,
        "## GMACs vs input size (paper Figure 6; multiply-accumulates incl. attention)\n\n"
        + gmacs_md
        + f"\n![GMACs vs input size]({png.name})\n",
    )
    return [md, png]


def _worker(argv: list[str]) -> None:
    request = json.loads(argv[0])
    cfg = Config(**request["config"])
    if request["reuse"]:
        reuse_freed_memory()
    use_fast_float32_matmuls()  # as src/train.py runs
    print(json.dumps(measure(cfg, memory=request["memory"], timing=request["timing"])))


if __name__ == "__main__":
    _worker(sys.argv[1:])
