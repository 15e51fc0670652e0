"""Training benchmark: images per second and peak memory of one training step of every task and
head (eager fp32, bf16 autocast, torch.compile), and the forward-pass fast paths of PVT-Small
measured against the issue's targets as ratios (never asserted).

    python src/bench.py suites=[training] [quick=true]

Training steps run through the real pipeline (`pvtlab.bench.steps`): the shapes recipe of the
task (its sizes and batch), a Lightning Trainer fitting a few batches, each timed from batch start
to batch end (forward, loss, backward, optimizer step); the median after a warm-up step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from pvtlab.bench import markdown_table, report_header, time_call, write_report
from pvtlab.bench.steps import HEADS, QUICK_DATA, measure_training_step

__all__ = ["forward_fast_paths", "run"]

# Targets of issue 10 (ratios in one run; reported, never asserted).
TARGET_COMPILE_FWD = 1.4  # compiled vs reference-attention eager forward
TARGET_BF16_FWD = 2.0  # bf16 autocast vs fp32 forward
TARGET_MATMUL_SHARE = 0.75  # compiled fp32 GMAC rate vs a large fp32 matmul's
TARGET_COMPILE_STEP = 1.3  # compiled vs eager training step


def _matmul_gmacs_per_s(n: int, repeats: int) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    seconds = time_call(lambda: a @ b, warmup=1, repeats=repeats)
    return n**3 / seconds / 1e9


def forward_fast_paths(
    name: str, size: int, batch: int, repeats: int, compile: bool = True
) -> dict[str, Any]:
    """Forward images/s of classifier `name` (eval, no grad) along each path, plus GMACs."""
    from pvtlab.models import count_gmacs, create_backbone

    torch.manual_seed(0)
    model = create_backbone(name, features_only=False, img_size=size).eval()
    with torch.device("meta"):
        gmacs = count_gmacs(create_backbone(name, features_only=False, img_size=size), (size, size))
    x = torch.randn(batch, 3, size, size)

    def timed(fn: Any) -> float:
        with torch.no_grad():
            return batch / time_call(fn, warmup=1, repeats=repeats)

    def with_attention(fused: bool) -> None:
        model.fused_attn = fused

    out: dict[str, Any] = {"gmacs_per_image": gmacs}
    with_attention(False)
    out["eager reference attention, fp32"] = timed(lambda: model(x))
    with_attention(True)
    out["eager fused attention, fp32"] = timed(lambda: model(x))

    def bf16() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(x)

    out["eager fused attention, bf16 autocast"] = timed(bf16)
    if compile:
        compiled = torch.compile(model)
        out["compiled, fp32"] = timed(lambda: compiled(x))
    return out


def cnn_memory_formats(name: str, size: int, batch: int, repeats: int) -> dict[str, float]:
    """Forward images/s of CNN classifier `name` in contiguous (NCHW) vs channels_last memory."""
    from pvtlab.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone(name, features_only=False).eval()
    x = torch.randn(batch, 3, size, size)
    out = {}
    for label, fmt in (
        ("contiguous", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        model = model.to(memory_format=fmt)
        inputs = x.contiguous(memory_format=fmt)
        with torch.no_grad():
            out[label] = batch / time_call(
                lambda m=model, i=inputs: m(i), warmup=1, repeats=repeats
            )
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def run(out_dir: Path, quick: bool) -> list[Path]:
    """Run the suite; write ``training.md`` into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_dir = out_dir / ".shapes" if quick else Path(os.environ.get("PVTLAB_DATA", "data"))
    backbone = "pvt_tiny"
    extra = QUICK_DATA if quick else ()
    steps = 1 if quick else 3
    # Compiled steps: the classifier only. Compiling a torchvision detector's training step took
    # over 10 minutes on 2 cores here (and RetinaNet's failed in the C++ build): beyond the
    # suite's budget. `python src/train.py compile=true ...` remains the way to try the others.
    compile_heads = {("classification", "linear")}

    rows, ratio_rows, results = [], [], {}
    for task, head in HEADS:
        variants = [("fp32", False, "32-true"), ("bf16 autocast", False, "bf16-mixed")]
        if (task, head) in compile_heads:
            variants.append(("fp32 compiled", True, "32-true"))
        for label, compiled, precision in variants:
            try:
                r = measure_training_step(
                    task, head, backbone, data_dir, steps=steps, compile=compiled,
                    precision=precision, extra=extra,
                )  # fmt: skip
            except Exception as error:  # a path that fails is a finding, not the end of the run
                results[(head, label)] = None
                rows.append(
                    (
                        task,
                        head,
                        backbone,
                        "-",
                        label,
                        f"failed: {type(error).__name__}: {str(error)[:80]}",
                        None,
                        None,
                        None,
                    )
                )
                continue
            results[(head, label)] = r
            rows.append(
                (
                    task,
                    head,
                    backbone,
                    r.batch,
                    label,
                    r.images_per_s,
                    1000 * r.step_s,
                    r.first_step_s,
                    r.peak_mib,
                )
            )
        eager = results.get((head, "fp32"))
        bf16 = results.get((head, "bf16 autocast"))
        comp = results.get((head, "fp32 compiled"))
        ratio_rows.append(
            (
                task,
                head,
                _ratio(bf16 and bf16.images_per_s, eager and eager.images_per_s),
                _ratio(comp and comp.images_per_s, eager and eager.images_per_s),
                TARGET_COMPILE_STEP,
            )
        )

    if quick:
        fwd_model, size, batch, repeats, mm = "pvt_tiny", 64, 2, 1, 256
    else:
        fwd_model, size, batch, repeats, mm = "pvt_small", 224, 32, 2, 2048
    # quick: the compiled training step above already shows that compilation works
    fwd = forward_fast_paths(fwd_model, size, batch, repeats, compile=not quick)
    matmul = _matmul_gmacs_per_s(mm, repeats=3)
    cnn_name, cnn_size = ("resnet18", 64) if quick else ("resnet50", 224)
    cnn = cnn_memory_formats(cnn_name, cnn_size, batch, repeats)
    paths = [k for k in fwd if k != "gmacs_per_image"]
    fwd_rows = [(k, fwd[k], fwd[k] * fwd["gmacs_per_image"]) for k in paths]
    fwd_rows.append((f"fp32 matmul {mm}x{mm}x{mm}", None, matmul))
    ref = fwd["eager reference attention, fp32"]
    fused = fwd["eager fused attention, fp32"]
    compiled = fwd.get("compiled, fp32")
    target_rows = [
        ("compiled vs reference-attention eager (forward)", _ratio(compiled, ref), TARGET_COMPILE_FWD),
        ("bf16 autocast vs fp32 (eager fused, forward)", _ratio(fwd["eager fused attention, bf16 autocast"], fused), TARGET_BF16_FWD),
        ("compiled fp32 GMAC/s vs large fp32 matmul GMAC/s", _ratio(compiled and compiled * fwd["gmacs_per_image"], matmul), TARGET_MATMUL_SHARE),
    ]  # fmt: skip
    target_rows += [
        (f"training step compiled vs eager: {task}/{head}", comp_ratio, TARGET_COMPILE_STEP)
        for task, head, _, comp_ratio, _ in ratio_rows
    ]
    target_rows = [
        (*r, None if r[1] is None else ("met" if r[1] >= r[2] else "missed")) for r in target_rows
    ]

    command = "python src/bench.py suites=[training]" + (" quick=true" if quick else "")
    notes = [
        f"Training steps: {backbone}, the shapes recipe of each task (64x64 images, its batch), "
        f"median of {steps} timed steps after 1 warm-up; `first step` includes compilation. "
        "Peak memory: resident-set high-water mark of the whole fit above its start (rough).",
        f"Forward: {fwd_model} classifier at {size}x{size}, batch {batch}, eval, no grad, median "
        f"of {repeats}; GMACs per image {fwd['gmacs_per_image']:.2f} (attention products included).",
        "Targets (issue 10) are ratios taken in this one run; they are reported, not asserted. "
        "A loaded machine shifts every figure: see the load average above.",
    ]
    if quick:
        notes.insert(
            0,
            "Quick run: tiny data, few steps; the figures show that each path works, not its speed.",
        )
    md = write_report(
        out_dir / "training.md",
        report_header("Training benchmark", command, notes),
        "## Training step per task and head\n\n"
        + markdown_table(
            [
                "task",
                "head",
                "backbone",
                "batch",
                "path",
                "img/s",
                "step ms",
                "first step s",
                "peak MiB",
            ],
            rows,
        ),
        "## Training-step ratios (> 1: faster than eager fp32)\n\n"
        + markdown_table(
            ["task", "head", "bf16 / fp32", "compiled / eager", "compile target"], ratio_rows
        ),
        "## Forward fast paths\n\n" + markdown_table(["path", "img/s", "GMAC/s"], fwd_rows),
        f"## channels_last for CNN baselines ({cnn_name} forward, {cnn_size}x{cnn_size}, batch {batch})\n\n"
        + markdown_table(
            ["memory format", "img/s", "vs contiguous"],
            [(k, v, v / cnn["contiguous"]) for k, v in cnn.items()],
        ),
        "## Targets\n\n" + markdown_table(["ratio", "measured", "target", "verdict"], target_rows),
    )
    return [md]
