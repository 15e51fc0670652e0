"""Training benchmark: images per second and peak memory of one training step of every task and
head (eager fp32, bf16 autocast, torch.compile), the forward-pass fast paths of PVT-Small
measured against the issue's targets as ratios (never asserted), and RetinaNet's training loss
alone, pvtlab's device-side one against torchvision's (`pvtlab.bench.losses`).

    python src/bench.py suites=[training] [quick=true]

Training steps run through the real pipeline (`pvtlab.bench.steps`): the shapes recipe of the
task (its sizes and batch), a Lightning Trainer fitting a few batches, each timed from batch start
to batch end (forward, loss, backward, optimizer step); the median after a warm-up step. Each
runs in a fresh process with the host allocator of `src/train.py`; on the CPU some eager fp32
steps also with glibc's default malloc, which gives large freed blocks back to the system every
step. On the CPU the two steps of the compile ratio (eager and compiled fp32) run in
`COMPILE_RATIO_ROUNDS` processes each, in turns, their timed steps pooled. On a GPU the steps
run under `trainer=gpu`, and compile is timed as users run it there: bf16 autocast, compiled
against eager.

The report is rewritten after each step measured, so a run stopped part-way keeps what it
measured.
"""

from __future__ import annotations

import gc
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from pvtlab.bench import (
    bench_device,
    failure,
    markdown_table,
    report_header,
    time_interleaved,
    write_report,
)
from pvtlab.bench.attention import (
    AttentionSetting,
    attention_kernels,
    attention_precision,
    attention_section,
    training_pass_memory,
    training_pass_section,
    training_passes,
)
from pvtlab.bench.backbones import Config, time_in_fresh_process
from pvtlab.bench.losses import (
    COCO_LOSS,
    QUICK_LOSS,
    retinanet_loss_paths,
    retinanet_loss_section,
)
from pvtlab.bench.plots import bar_chart, new_figure, save_figure
from pvtlab.bench.steps import (
    HEADS,
    QUICK_DATA,
    StepResult,
    measure_training_step,
    measure_training_step_in_fresh_process,
)

__all__ = ["RatioRow", "StepPath", "forward_fast_paths", "run", "step_paths"]

# Targets of issue 10 (ratios in one run on the 2-core CPU; reported, never asserted).
TARGET_COMPILE_FWD = 1.4  # compiled vs reference-attention eager forward
TARGET_BF16_FWD = 2.0  # bf16 autocast vs fp32 forward
TARGET_MATMUL_SHARE = 0.75  # compiled fp32 GMAC rate vs a large fp32 matmul's
TARGET_COMPILE_STEP = 1.3  # compiled vs eager training step
# Heads whose eager fp32 step is also timed with glibc's default malloc (CPU only).
DEFAULT_MALLOC_HEADS = ("linear", "retinanet", "semantic_fpn")
DEFAULT_MALLOC = "fp32, glibc default malloc"
# On the CPU the eager and compiled steps of the compile ratio run in this many fresh processes
# each, taken in turns (eager, compiled, eager, ...), their timed steps pooled: on this machine
# one process often runs 5-10% faster or slower than the next, at times much more (the same
# eager step: 287-330 ms over four processes; a compiled Trans2Seg step 258 vs 366 ms), which a
# single pair reads as a gain or a loss from compiling.
COMPILE_RATIO_ROUNDS = 3


MATMUL = "fp32 matmul"
MATMUL_BF16 = "bf16 matmul"
REFERENCE = "eager reference attention, fp32"
EAGER_FP32 = "eager fused attention, fp32"
EAGER_BF16 = "eager fused attention, bf16 autocast"
EAGER_BF16_SDPA = "eager fused attention, bf16 autocast, SDPA throughout"
COMPILED = "compiled, fp32 (train.py compile=true)"
FROZEN_FP32 = "compiled with frozen weights, fp32 (eval.py compile=true)"
FROZEN_BF16 = "compiled with frozen weights, bf16 autocast (eval.py compile=true)"
# The forward paths as the plot's axis names them.
SHORT_NAMES = {
    REFERENCE: "eager, reference attn",
    EAGER_FP32: "eager fp32",
    EAGER_BF16: "eager bf16",
    EAGER_BF16_SDPA: "eager bf16, SDPA",
    COMPILED: "compile=true fp32",
    FROZEN_FP32: "frozen compile fp32",
    FROZEN_BF16: "frozen compile bf16",
}


@dataclass(frozen=True)
class StepPath:
    """One way of running a training step: a row of the step table."""

    label: str
    precision: str  # Lightning's trainer.precision
    compiled: bool = False
    reuse_freed_memory: bool = True  # src/train.py's host allocator setting
    profile: bool = False  # one more batch, profiled for its library-kernel share (CPU)
    loop: str | None = None  # None: each step timed on its own; else `pvtlab.bench.steps.LOOPS`


FP32 = StepPath("fp32", "32-true", profile=True)
BF16 = StepPath("bf16 autocast", "bf16-mixed")
# What compile=true is measured against: the eager step of the precision users train with on
# that device (fp32 on the CPU, where bf16 gains little in training; bf16 under trainer=gpu).
COMPILED_STEP = {
    "cpu": (FP32, StepPath("fp32 compiled", "32-true", compiled=True, profile=True)),
    "cuda": (BF16, StepPath("bf16 compiled", "bf16-mixed", compiled=True)),
}


# The loop around the classifier's step, timed as a whole, neither waiting for the device
# between steps: with no callbacks or logger, and as `src/train.py` runs it (its progress bar,
# non-finite-loss guard, learning-rate monitor, ... and a CSV logger). What the second costs
# more is what the run's callbacks and their reads back to the host cost.
LOOP_PATHS = {
    "cpu": (
        StepPath("fp32, loop without callbacks", "32-true", loop="bare"),
        StepPath("fp32, src/train.py's loop", "32-true", loop="run"),
    ),
    "cuda": (
        StepPath("bf16 autocast, loop without callbacks", "bf16-mixed", loop="bare"),
        StepPath("bf16 autocast, src/train.py's loop", "bf16-mixed", loop="run"),
    ),
}


def step_paths(device: str, task: str, head: str, quick: bool) -> list[StepPath]:
    """The step paths timed for one head on `device` ("cpu" or "cuda"). Compiling takes a
    minute or more per head on 2 cores, so quick runs (the tests) compile the classifier only.
    The classifier's loop is also timed with and without the run's callbacks (`LOOP_PATHS`)."""
    paths = [FP32, BF16]
    if task == "classification":
        paths += LOOP_PATHS[device]
    if device == "cpu" and head in DEFAULT_MALLOC_HEADS and (not quick or task == "classification"):
        paths.append(StepPath(DEFAULT_MALLOC, "32-true", reuse_freed_memory=False))
    if not quick or task == "classification":
        paths.append(COMPILED_STEP[device][1])
    if device != "cpu":  # the library-kernel share is a CPU-time measure
        paths = [replace(p, profile=False) for p in paths]
    return paths


def forward_fast_paths(
    name: str,
    size: int,
    batch: int,
    repeats: int,
    compile: bool = True,
    matmul: int = 2048,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Forward images/s of classifier `name` (eval, no grad) along each path, its GMACs per
    image, and the GMAC/s of a `matmul`-sized square matrix product in fp32 and bf16 (keys
    MATMUL, MATMUL_BF16), all timed in turns so that their ratios hold on a machine whose
    speed drifts. Compiled: as `src/train.py` compiles and as `src/eval.py` does (weights
    frozen in, `pvtlab.tasks.base.FROZEN_WEIGHTS`). `device`: `bench_device()` by default."""
    from pvtlab.models import count_gmacs, create_backbone
    from pvtlab.tasks.base import FROZEN_WEIGHTS, frozen_weight_compilation

    device = device or bench_device()
    torch.manual_seed(0)
    model = create_backbone(name, features_only=False, img_size=size).eval().to(device)
    with torch.device("meta"):
        gmacs = count_gmacs(create_backbone(name, features_only=False, img_size=size), (size, size))
    x = torch.randn(batch, 3, size, size, device=device)
    a, b = torch.randn(matmul, matmul, device=device), torch.randn(matmul, matmul, device=device)
    a16, b16 = a.bfloat16(), b.bfloat16()

    def run(forward: Any, fused: bool = True, bf16: bool = False, sdpa_only: bool = False) -> Any:
        model.fused_attn = fused
        with attention_precision(device, bf16, sdpa_only):
            return forward(x)

    def frozen(forward: Any, bf16: bool) -> Any:
        with frozen_weight_compilation():
            return run(forward, bf16=bf16)

    paths: dict[str, Any] = {
        REFERENCE: lambda: run(model, fused=False),
        EAGER_FP32: lambda: run(model),
        EAGER_BF16: lambda: run(model, bf16=True),
    }
    if device.type == "cpu":  # where the fused path takes the explicit product (bf16)
        paths[EAGER_BF16_SDPA] = lambda: run(model, bf16=True, sdpa_only=True)
    if compile:  # both compiled on the fused path
        compiled = torch.compile(model)
        compiled_frozen = torch.compile(model, options=FROZEN_WEIGHTS)
        paths[COMPILED] = lambda: run(compiled)
        paths[FROZEN_FP32] = lambda: frozen(compiled_frozen, bf16=False)
        paths[FROZEN_BF16] = lambda: frozen(compiled_frozen, bf16=True)
    paths[MATMUL] = lambda: a @ b
    paths[MATMUL_BF16] = lambda: a16 @ b16
    with torch.no_grad():
        seconds = time_interleaved(paths, warmup=1, repeats=repeats, device=device)
    out: dict[str, Any] = {key: batch / s for key, s in seconds.items()}
    out["gmacs_per_image"] = gmacs
    for key in (MATMUL, MATMUL_BF16):
        out[key] = matmul**3 / seconds[key] / 1e9
    return out


def cnn_memory_formats(
    name: str, size: int, batch: int, repeats: int, device: torch.device | None = None
) -> dict[str, tuple[float, float]]:
    """(forward, training step) images/s of CNN classifier `name` with NCHW (contiguous) vs
    NHWC (channels_last) weights and inputs; the step is forward, loss, backward and AdamW.
    The two formats are timed in turns."""
    from pvtlab.models import create_backbone

    device = device or bench_device()
    x = torch.randn(batch, 3, size, size, device=device)
    labels = torch.zeros(batch, dtype=torch.long, device=device)
    models, inputs, optimizers = {}, {}, {}
    for label, channels_last in (("contiguous", False), ("channels_last", True)):
        torch.manual_seed(0)
        model = create_backbone(name, features_only=False, channels_last=channels_last)
        models[label] = model.to(device)  # keeps each parameter's memory format
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        inputs[label] = x.contiguous(memory_format=fmt)
        optimizers[label] = torch.optim.AdamW(models[label].parameters(), lr=1e-4, fused=True)

    def forward(label: str) -> Any:
        return models[label](inputs[label])

    def train_step(label: str) -> None:
        optimizers[label].zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(forward(label), labels).backward()
        optimizers[label].step()

    def timed(fn: Any) -> dict[str, float]:
        return time_interleaved(
            {k: lambda k=k: fn(k) for k in models}, repeats=repeats, device=device
        )

    for model in models.values():
        model.eval()
    with torch.no_grad():
        fwd = timed(forward)
    for model in models.values():
        model.train()
    step = timed(train_step)
    return {k: (batch / fwd[k], batch / step[k]) for k in models}


# AdamW implementations: a Python loop over parameters (torch's CPU default), multi-tensor (its
# CUDA default), and the one-kernel update that pvtlab's optimizers use (`task.optimizer.fused`).
OPTIMIZER_PATHS = {
    "per-parameter loop (torch's CPU default)": {"foreach": False, "fused": False},
    "multi-tensor (foreach)": {"foreach": True},
    "fused (pvtlab's default)": {"fused": True},
}


def optimizer_step_paths(
    name: str, repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """Seconds of one AdamW step over the parameters of classifier `name` (gradients set), per
    implementation in OPTIMIZER_PATHS, timed in turns."""
    from pvtlab.models import create_backbone

    device = device or bench_device()
    torch.manual_seed(0)
    model = create_backbone(name, features_only=False).to(device)
    grads = [torch.randn_like(p) for p in model.parameters()]

    def adamw(settings: dict[str, bool]) -> torch.optim.Optimizer:
        params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for param, grad in zip(params, grads, strict=True):
            param.grad = grad
        return torch.optim.AdamW(params, lr=1e-4, **settings)

    optimizers = {label: adamw(settings) for label, settings in OPTIMIZER_PATHS.items()}
    return time_interleaved(
        {k: o.step for k, o in optimizers.items()}, repeats=repeats, device=device
    )


ALLOCATORS = {"glibc default malloc": False, "reuse_freed_memory (src/train.py)": True}


def allocator_paths(cfg: Config) -> dict[str, tuple[float, float]]:
    """Forward and forward + backward images/s of `cfg`'s model (fused attention), each host
    allocator setting in a fresh process of its own (the setting lasts for the process)."""
    out = {}
    for label, reuse in ALLOCATORS.items():
        fused = time_in_fresh_process(cfg, reuse_freed_memory=reuse)[0]
        out[label] = (fused["fwd_img_s"], fused["fwdbwd_img_s"])
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _compiled_ceiling(eager: StepResult | None, compiled: StepResult | None) -> float | None:
    """Eager step time over the library-kernel time of the compiled step: the speed-up if
    compile removed everything but those kernels, as the compiled graph calls them."""
    if not eager or not compiled or not compiled.library_share:
        return None
    return eager.step_s / (compiled.library_share * compiled.step_s)


def _parts_ms(eager: StepResult | None, compiled: StepResult | None) -> str | None:
    """The compiled parts' CPU time outside library kernels in one profiled step, eager and
    compiled: what compile had to work on and what it left of it."""
    if not eager or not compiled or eager.parts_s is None or compiled.parts_s is None:
        return None
    return f"{eager.parts_s * 1e3:.3g} / {compiled.parts_s * 1e3:.3g}"


def _measure_path(
    task: str, head: str, path: StepPath, data_dir: Path, steps: int, extra: list[str]
) -> StepResult | str:
    """One path's step of one head. On the CPU in a fresh process (its peak resident memory
    and allocator its own); on a GPU in this one, whose CUDA peak counter is per tensor, with
    dynamo's caches emptied first. A path that fails is a finding, not the end of the run: its
    error message stands in for the result."""
    kwargs = dict(
        steps=steps, compile=path.compiled, precision=path.precision, extra=extra,
        profile=path.profile, loop=path.loop,
    )  # fmt: skip
    try:
        if bench_device().type == "cpu":
            return measure_training_step_in_fresh_process(
                task, head, "pvt_tiny", data_dir, reuse_freed_memory=path.reuse_freed_memory,
                **kwargs,
            )  # fmt: skip
        torch._dynamo.reset()  # each compiled head starts as in a fresh process
        try:
            return measure_training_step(task, head, "pvt_tiny", data_dir, **kwargs)
        finally:
            gc.collect()  # the fitted run's loader workers go with it, not at some later step
    except Exception as error:
        return failure(error)


def _step_rows(task: str, head: str, runs: dict[str, list[StepResult | str]]) -> list[tuple]:
    rows = []
    for label, measured in runs.items():
        r = pooled(measured)
        if isinstance(r, str):
            rows.append((task, head, "pvt_tiny", "-", label, r, None, None, None, len(measured)))
        else:
            rows.append(
                (
                    task,
                    head,
                    "pvt_tiny",
                    r.batch,
                    label,
                    r.images_per_s,
                    1000 * r.step_s,
                    r.first_step_s,
                    r.peak_mib,
                    len(measured),
                )
            )
    return rows


def pooled(runs: Sequence[StepResult | str]) -> StepResult | str:
    """One path measured in several processes as one row: the median of all their timed steps;
    first step (the cold compile), peak memory and library share from the first that ran. A
    path whose every run failed keeps its first failure."""
    measured = [r for r in runs if isinstance(r, StepResult)]
    if not measured:
        return runs[0]
    first = measured[0]
    times = [t for r in measured for t in r.step_times_s]
    if not times:
        return first
    step = statistics.median(times)
    return replace(first, images_per_s=first.batch / step, step_s=step, step_times_s=times)


def _per_process_ratios(runs: dict[str, list[StepResult | str]], device: str) -> str | None:
    """`min-max` of compiled / eager over the process pairs taken in turns; None for one pair."""
    eager, compiled = (runs.get(path.label, []) for path in COMPILED_STEP[device])
    ratios = [
        c.images_per_s / e.images_per_s
        for e, c in zip(eager, compiled, strict=False)  # mid-run, eager is one ahead
        if isinstance(e, StepResult) and isinstance(c, StepResult)
    ]
    return f"{min(ratios):.3g}-{max(ratios):.3g}" if len(ratios) > 1 else None


class RatioRow(NamedTuple):
    """A row of the training-step ratio table, in its column order (None: not measured)."""

    task: str
    head: str
    library_share: float | None  # of one profiled eager fp32 step (CPU)
    compile_ceiling: float | None  # 1 / library_share
    compiled_parts_ceiling: float | None  # 1 / (1 - parts_share), same eager step
    parts_ms: str | None  # the parts' time outside library kernels: "eager / compiled" ms
    compiled_library_share: float | None
    compiled_ceiling: float | None  # the eager step over the compiled step's library time
    reused_vs_default_malloc: float | None
    bf16_speedup: float | None  # bf16 autocast over fp32
    compile_speedup: float | None  # COMPILED_STEP's compiled path over its eager one
    compile_speedup_per_pair: str | None  # min-max over the process pairs
    compile_target: float
    run_loop_vs_bare: float | None  # LOOP_PATHS: src/train.py's loop over the bare loop


def _ratio_row(
    task: str, head: str, runs: dict[str, list[StepResult | str]], device: str
) -> RatioRow:
    results = {label: pooled(r) for label, r in runs.items()}

    def get(label: str) -> StepResult | None:
        r = results.get(label)
        return r if isinstance(r, StepResult) else None

    eager_path, compiled_path = COMPILED_STEP[device]
    fp32, bf16, malloc = get(FP32.label), get(BF16.label), get(DEFAULT_MALLOC)
    eager, compiled = get(eager_path.label), get(compiled_path.label)
    bare_loop, run_loop = (get(path.label) for path in LOOP_PATHS[device])
    share = fp32 and fp32.library_share
    parts = fp32 and fp32.parts_share
    return RatioRow(
        task,
        head,
        share,
        None if not share else 1 / share,
        None if parts is None else 1 / (1 - parts),
        _parts_ms(eager, compiled),
        compiled and compiled.library_share,
        _compiled_ceiling(eager, compiled),
        _ratio(fp32 and fp32.images_per_s, malloc and malloc.images_per_s),
        _ratio(bf16 and bf16.images_per_s, fp32 and fp32.images_per_s),
        _ratio(compiled and compiled.images_per_s, eager and eager.images_per_s),
        _per_process_ratios(runs, device),
        TARGET_COMPILE_STEP,
        _ratio(run_loop and run_loop.images_per_s, bare_loop and bare_loop.images_per_s),
    )


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Run the suite; write ``training.md`` and ``training.png`` into `out_dir` (rewritten
    after each step path)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / ".shapes" if quick else Path(os.environ.get("PVTLAB_DATA", "data"))
    device = bench_device()
    on_cpu = device.type == "cpu"
    extra = list(QUICK_DATA) if quick else []
    steps = 1 if quick else 10  # one loader worker shares the 2 cores: few steps are noisy

    if quick:
        fwd_model, size, batch, repeats, mm = "pvt_tiny", 64, 2, 1, 256
    else:  # a GPU times a forward in milliseconds: more repeats cost little
        fwd_model, size, batch, mm = "pvt_small", 224, 32, 2048 if on_cpu else 8192
        repeats = 3 if on_cpu else 20
    # quick: the compiled training step below already shows that compilation works
    fwd = forward_fast_paths(fwd_model, size, batch, repeats, compile=not quick, matmul=mm)
    # The host allocator matters on the CPU only: a GPU's tensors live in CUDA's caching pool.
    allocator = (
        allocator_paths(Config(fwd_model, size, size, batch, False, repeats, 1)) if on_cpu else {}
    )
    cnn_name, cnn_size = ("resnet18", 64) if quick else ("resnet50", 224)
    cnn = cnn_memory_formats(cnn_name, cnn_size, batch, repeats)
    optimizer_s = optimizer_step_paths("pvt_tiny", repeats=3 if quick else 10)
    forward_sections = _forward_sections(
        fwd, allocator, cnn, optimizer_s, fwd_model, size, batch, mm, cnn_name, cnn_size
    )
    forward_sections[1:1] = _attention_sections(quick, fwd_model, size, batch)
    loss_setting = QUICK_LOSS if quick else COCO_LOSS
    loss_repeats = 1 if quick else 10 if on_cpu else 50
    loss_timing = retinanet_loss_paths(loss_setting, loss_repeats)
    forward_sections.append(retinanet_loss_section(loss_setting, loss_timing, loss_repeats))

    # Every eager step before the first compiled one: a run stopped during compilation (a
    # minute or more a head) still has the whole eager table.
    plan = [(t, h, p) for t, h in HEADS for p in step_paths(device.type, t, h, quick)]
    plan.sort(key=lambda item: item[2].compiled)
    if on_cpu and not quick:  # then the compile ratio's pair again, in turns, unprofiled
        pair = [replace(p, profile=False) for p in COMPILED_STEP["cpu"]]
        for _ in range(COMPILE_RATIO_ROUNDS - 1):
            plan += [(t, h, p) for t, h in HEADS for p in pair]
            plan += [("classification", "linear", p) for p in LOOP_PATHS["cpu"]]
    runs: dict[tuple[str, str], dict[str, list[StepResult | str]]] = {key: {} for key in HEADS}
    header = _header(device, quick, steps, fwd_model, size, batch, repeats, fwd["gmacs_per_image"])
    md = out_dir / "training.md"
    for task, head, path in plan:
        result = _measure_path(task, head, path, data_dir, steps, extra)
        runs[(task, head)].setdefault(path.label, []).append(result)
        rows = [row for (t, h), r in runs.items() for row in _step_rows(t, h, r)]
        ratio_rows = [_ratio_row(t, h, r, device.type) for (t, h), r in runs.items()]
        png = _plot(ratio_rows, fwd, device.type, out_dir / "training.png")
        write_report(
            md,
            header,
            _step_sections(rows, ratio_rows, device.type),
            *forward_sections,
            _targets_section(fwd, ratio_rows, on_cpu),
            f"![Training-step ratios and forward paths]({png.name})\n",
        )
    return [md, png]


def _attention_sections(quick: bool, fwd_model: str, size: int, batch: int) -> list[str]:
    """The attention kernels at the forward paths' shapes and at a segmentation crop (larger
    score tensors; on a GPU also at a detection input), and a training pass by attention
    kernel there and at a detection input with its training batch (the largest: 2^27.1 scores
    in stage 1)."""
    classifier = AttentionSetting(fwd_model, size, batch)
    settings = [classifier] if quick else [classifier, AttentionSetting(fwd_model, 512, 8, True)]
    repeats = 1 if quick else 5
    detection = [] if quick else [AttentionSetting(fwd_model, 800, 2, True, width=1333)]
    # On a GPU, the kernels at detection inputs too, batch 1 and 2: where SDPA's backward is
    # short of work and pvtlab folds the queries into the batch (minutes on the CPU).
    on_gpu = bench_device().type == "cuda"
    at_detection = [AttentionSetting(fwd_model, 800, 1, True, width=1333), *detection]
    kernel_settings = [*settings, *at_detection] if on_gpu and not quick else settings
    kernels = [row for s in kernel_settings for row in attention_kernels(s, repeats)]
    pass_settings = [*settings, *detection]
    passes = {s: training_passes(s, repeats=1 if quick else 3) for s in pass_settings}
    peaks = {s: training_pass_memory(s) for s in pass_settings}
    return [attention_section(kernels), training_pass_section(passes, peaks)]


def _plot(ratio_rows: list[RatioRow], fwd: dict[str, Any], device: str, path: Path) -> Path:
    """Left: each head's training step under bf16 autocast and compiled, as speed-ups over
    eager, with the compile target. Right: the forward paths' images/s, with the compile
    target (1.4x the reference-attention eager path)."""
    eager, compiled = COMPILED_STEP[device]
    fig, (steps, forward) = new_figure(panels=2)
    bar_chart(
        steps,
        [f"{row.task}/{row.head}" for row in ratio_rows],
        {
            "bf16 autocast / fp32": [row.bf16_speedup for row in ratio_rows],
            f"{compiled.label} / {eager.label}": [row.compile_speedup for row in ratio_rows],
        },
        ylabel="speed-up over the eager step",
        title="Training step (pvt_tiny, shapes recipes)",
        reference=(TARGET_COMPILE_STEP, f"compile target {TARGET_COMPILE_STEP:g}x"),
    )
    paths = [p for p in SHORT_NAMES if p in fwd]
    bar_chart(
        forward,
        [SHORT_NAMES[p] for p in paths],
        {"forward img/s": [fwd[p] for p in paths]},
        ylabel="images / s",
        title="Forward paths (classifier, eval)",
        reference=(
            TARGET_COMPILE_FWD * fwd[REFERENCE],
            f"compile target {TARGET_COMPILE_FWD:g}x reference",
        ),
    )
    return save_figure(fig, path)


def _header(
    device: torch.device,
    quick: bool,
    steps: int,
    fwd_model: str,
    size: int,
    batch: int,
    repeats: int,
    gmacs: float,
) -> str:
    command = "python src/bench.py suites=[training]" + (" quick=true" if quick else "")
    peak = (
        "the process's resident-set high-water mark during the fit above its size at the start "
        "of the fit"
        if device.type == "cpu"
        else "torch.cuda.max_memory_allocated during the fit (weights, optimizer state, "
        "activations)"
    )
    notes = [
        f"Device: {device.type}"
        + (
            ""
            if device.type == "cpu"
            else " (trainer=gpu; fp32 matrix products in TF32, as src/train.py sets them)"
        )
        + ".",
        f"Training steps: pvt_tiny, the shapes recipe of each task (64x64 images, its batch), "
        f"median of {steps} timed steps after 1 warm-up; `first step` includes compilation. "
        "Each step in a fresh process with `src/train.py`'s allocator setting "
        f"(`reuse_freed_memory`) unless its path says otherwise. The `loop` paths time the "
        "steps as a whole instead (step ms: their mean; first step: the warm-up's, data "
        f"loading included). Peak memory: {peak}."
        + (
            f" The compile ratio's two steps (fp32, fp32 compiled) and the classifier's two "
            f"loops ran in {COMPILE_RATIO_ROUNDS} processes each, taken in turns, their timed "
            "steps pooled (`processes`): one process often runs 5-10% off the next on this "
            "machine, at times more."
            if device.type == "cpu" and not quick
            else ""
        ),
        f"Forward: {fwd_model} classifier at {size}x{size}, batch {batch}, eval, no grad, median "
        f"of {repeats} taken in turns with the other paths and the matmuls; GMACs per image "
        f"{gmacs:.2f} (attention products included). Fused attention is SDPA except on the CPU "
        "in bf16, where it is the explicit product up to a limit of scores a call (the "
        "attention table); `SDPA throughout` turns that choice off.",
        "Targets (issue 10, set for the 2-core CPU) are ratios taken in this one run; they are "
        "reported, not asserted. A loaded machine shifts every figure: see the load average "
        "above. Ceiling: the ratio the path could not beat on this machine: the forward at the "
        "large aten matmul's GMAC rate (compile, fp32; the frozen path's prepacked oneDNN "
        "products can pass it), every operation as much faster in bf16 as "
        "the matmul is (bf16), a training step whose time outside the library kernels in the "
        "parts compile takes is zero (compile, CPU only: the ceiling for the compiled parts of "
        "the step-ratio table).",
    ]
    if quick:
        notes.insert(
            0,
            "Quick run: tiny data, few steps; the figures show that each path works, not its speed.",
        )
    return report_header("Training benchmark", command, notes)


def _step_sections(rows: list[tuple], ratio_rows: list[RatioRow], device: str) -> str:
    eager, compiled = COMPILED_STEP[device]
    bare_loop, run_loop = LOOP_PATHS[device]
    steps = markdown_table(
        ["task", "head", "backbone", "batch", "path", "img/s", "step ms", "first step s",
         "peak MiB", "processes"],
        rows,
    )  # fmt: skip
    ratios = markdown_table(
        [
            "task",
            "head",
            "library-kernel share (eager fp32)",
            "compile ceiling",
            "ceiling, compiled parts",
            "compiled parts outside library kernels, ms: eager / compiled",
            "library-kernel share (compiled)",
            "ceiling from the compiled step",
            "reused memory / default malloc",
            "bf16 / fp32",
            "compiled / eager",
            "compiled / eager, each process pair",
            "compile target",
            "train.py's loop / loop without callbacks",
        ],
        ratio_rows,
    )
    return (
        "## Training step per task and head\n\n"
        + steps
        + "\n## Training-step ratios (> 1: faster than eager fp32)\n\n"
        f"`compiled / eager`: {compiled.label} against {eager.label}. "
        "Library-kernel share (CPU): the part of one profiled eager fp32 step's CPU time spent in "
        "oneDNN / MKL matrix products and convolutions and the fused attention "
        "(`pvtlab.bench.steps.LIBRARY_OPS`). torch.compile fuses what lies around those "
        "kernels, not the kernels, so the compile ceiling 1 / share is the most it could gain "
        "even if everything else took no time. `compile=true` compiles only the static-shape "
        "parts (the whole classifier or segmenter; a detector's backbone, FPN and dense "
        "branches or DETR's transformer), so the ceiling for the compiled parts counts only "
        "the time outside the library kernels spent inside those parts, forward and backward "
        "(`pvtlab.bench.profile_parts`), in the same profiled eager step: 1 / (1 - that "
        "share), the most compile could gain if that time vanished; the rest (the loss, "
        "target assignment, NMS, the optimizer, the loop) stays as it is. Beside it, that "
        "time in CPU milliseconds, and the same count in one profiled compiled step (dynamo "
        "names the compiled parts' regions): what compile had to work on, and what its "
        "kernels and calls still take of it. The library-kernel share of "
        "one profiled compiled step "
        "says how much of it is still outside those kernels (inductor's own kernels, the "
        "optimizer, copies, dispatch); its ceiling, the eager step over the compiled step's "
        "library-kernel time, is the bound with the kernels as compile calls them. "
        f"`train.py's loop / loop without callbacks`: {run_loop.label} against "
        f"{bare_loop.label}, each timed as a whole, the device waited for only at its ends "
        "(what `src/train.py`'s callbacks and logger cost, the progress bar's and the "
        "non-finite-loss guard's reads back to the host included).\n\n" + ratios
    )


def _forward_sections(
    fwd: dict[str, Any],
    allocator: dict[str, tuple[float, float]],
    cnn: dict[str, tuple[float, float]],
    optimizer_s: dict[str, float],
    fwd_model: str,
    size: int,
    batch: int,
    matmul: int,
    cnn_name: str,
    cnn_size: int,
) -> list[str]:
    gmacs = fwd["gmacs_per_image"]
    paths = {k: v for k, v in fwd.items() if k not in (MATMUL, MATMUL_BF16, "gmacs_per_image")}
    mm_rows = [(f"{k} {matmul}x{matmul}x{matmul}", None, fwd[k]) for k in (MATMUL, MATMUL_BF16)]
    loop_s = optimizer_s[next(iter(OPTIMIZER_PATHS))]
    sections = [
        "## Forward fast paths\n\n"
        + markdown_table(
            ["path", "img/s", "GMAC/s"], [(k, v, v * gmacs) for k, v in paths.items()] + mm_rows
        ),
        "## Optimizer step (AdamW over pvt_tiny's parameters, median of steps taken in turns)\n\n"
        + markdown_table(
            ["implementation", "step ms", "speed-up vs loop"],
            [(k, 1000 * v, loop_s / v) for k, v in optimizer_s.items()],
        ),
    ]
    if allocator:
        base_f, base_fb = allocator[next(iter(ALLOCATORS))]  # glibc's default
        sections.append(
            f"## Host allocator ({fwd_model}, {size}x{size}, batch {batch}, fused attention, "
            "fp32, a fresh process each)\n\n"
            "glibc hands every block above its mmap threshold (32 MiB at most) back to the "
            "system when freed, so the next pass faults its pages in again; "
            "`reuse_freed_memory` keeps them (`pvtlab.utils.allocator`).\n\n"
            + markdown_table(
                [
                    "allocator",
                    "forward img/s",
                    "vs default",
                    "forward + backward img/s",
                    "vs default",
                ],
                [
                    (k, f, _ratio(f, base_f), fb, _ratio(fb, base_fb))
                    for k, (f, fb) in allocator.items()
                ],
            )
        )
    base_fwd, base_step = cnn["contiguous"]
    sections.append(
        f"## channels_last for CNN baselines ({cnn_name}, {cnn_size}x{cnn_size}, batch {batch})"
        "\n\n`backbone.memory_format=channels_last`, the default of the CNN baselines' configs."
        "\n\n"
        + markdown_table(
            [
                "memory format",
                "forward img/s",
                "vs contiguous",
                "train step img/s",
                "vs contiguous",
            ],
            [(k, f, f / base_fwd, s, s / base_step) for k, (f, s) in cnn.items()],
        )
    )
    return sections


def _targets_section(fwd: dict[str, Any], ratio_rows: list[RatioRow], on_cpu: bool) -> str:
    gmacs = fwd["gmacs_per_image"]
    ref, compiled = fwd[REFERENCE], fwd.get(COMPILED)
    # What no software could beat here: the forward at the large matmul's rate (fp32), every
    # operation as much faster in bf16 as the matmul is.
    fp32_ceiling = _ratio(fwd[MATMUL], ref * gmacs)
    bf16_ceiling = _ratio(fwd[MATMUL_BF16], fwd[MATMUL])
    rows = [
        ("compiled (compile=true) vs reference-attention eager, fp32 forward", _ratio(compiled, ref), TARGET_COMPILE_FWD, fp32_ceiling),
        ("compiled with frozen weights (eval.py compile=true) vs reference-attention eager, fp32 forward", _ratio(fwd.get(FROZEN_FP32), ref), TARGET_COMPILE_FWD, fp32_ceiling),
        ("bf16 autocast vs fp32, eager fused forward", _ratio(fwd[EAGER_BF16], fwd[EAGER_FP32]), TARGET_BF16_FWD, bf16_ceiling),
        ("bf16 autocast vs fp32, forward compiled with frozen weights (eval.py compile=true)", _ratio(fwd.get(FROZEN_BF16), fwd.get(FROZEN_FP32)), TARGET_BF16_FWD, bf16_ceiling),
        ("compiled fp32 (compile=true) GMAC/s vs large fp32 matmul GMAC/s", _ratio(compiled and compiled * gmacs, fwd[MATMUL]), TARGET_MATMUL_SHARE, 1.0),
    ]  # fmt: skip
    rows += [
        (f"training step compiled vs eager: {r.task}/{r.head}", r.compile_speedup,
         r.compile_target, r.compiled_parts_ceiling or r.compile_ceiling)
        for r in ratio_rows
    ]  # fmt: skip
    rows = [(*r, None if r[1] is None else ("met" if r[1] >= r[2] else "missed")) for r in rows]
    where = "" if on_cpu else " (set for the 2-core CPU; on this GPU for comparison)"
    return f"## Targets{where}\n\n" + markdown_table(
        ["ratio", "measured", "target", "ceiling", "verdict"], rows
    )
