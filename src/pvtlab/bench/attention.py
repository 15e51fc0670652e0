"""SDPA against the explicit softmax product at the attention shapes of PVT: the measurement
behind `pvtlab.models.attention.explicit_attention_is_faster`, which picks the explicit product
on the CPU in bf16 up to a limit of scores a call, and that choice's effect on a whole training
pass: its speed, and its peak memory (the explicit product keeps its score tensor for the
backward, SDPA a log-sum-exp per query).

The module runs as a worker too: ``python -m pvtlab.bench.attention <request>`` measures one
training pass's peak memory in a fresh process (`training_pass_memory`)."""

from __future__ import annotations

import functools
import json
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pvtlab.bench import (
    PEAK_MEMORY_ENV,
    PeakMemory,
    bench_device,
    markdown_table,
    run_worker,
    time_interleaved,
)
from pvtlab.models.attention import (
    FOLDING_DEVICE_TYPES,
    backward_query_chunks,
    cpu_explicit_attention_max_scores,
    explicit_attention,
    explicit_attention_is_faster,
    explicit_attention_limit,
    query_folded_attention,
)
from pvtlab.utils.allocator import freed_memory_is_reused

__all__ = [
    "AttentionRow",
    "AttentionSetting",
    "attention_kernels",
    "attention_precision",
    "attention_section",
    "attention_shapes",
    "training_pass_memory",
    "training_pass_section",
    "training_passes",
]

KERNELS = {"SDPA": F.scaled_dot_product_attention, "explicit": explicit_attention}
FOLDED = "SDPA, queries folded"
# Training passes of `training_passes`: label -> (bf16 autocast, SDPA throughout).
PASSES = {
    "fp32": (False, True),
    "bf16 autocast, SDPA throughout": (True, True),
    "bf16 autocast, explicit product where faster (default)": (True, False),
}


class AttentionSetting(NamedTuple):
    """A PVT model on a batch of images: whose attention shapes are measured."""

    name: str
    size: int  # the images' height, and their width unless `width` is given
    batch: int
    features_only: bool = False  # the dense-prediction backbone (no class token)
    width: int | None = None

    @property
    def image_size(self) -> tuple[int, int]:
        return self.size, self.width or self.size

    def __str__(self) -> str:
        kind = "backbone" if self.features_only else "classifier"
        height, width = self.image_size
        return f"{self.name} {kind}, {height}x{width}, batch {self.batch}"


class AttentionRow(NamedTuple):
    setting: AttentionSetting
    stage: int
    shape: tuple[int, int, int, int, int]  # batch, heads, queries, keys, head_dim
    dtype: str
    backward: bool  # forward alone or forward + backward
    sdpa_ms: float
    explicit_ms: float
    taken: str  # the kernel `SpatialReductionAttention` runs at this shape and dtype
    # SDPA with the queries folded into the batch (`pvtlab.models.attention`), where pvtlab's
    # training folds them (shapes whose backward would be short of work); else None.
    folded_ms: float | None = None
    chunks: int = 1


class _RecordAttention(TorchFunctionMode):
    """Records the (queries shape, keys count) of every SDPA call made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], int]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func is F.scaled_dot_product_attention:
            self.shapes.append((tuple(args[0].shape), args[1].shape[-2]))
        return func(*args, **(kwargs or {}))


def _model(setting: AttentionSetting) -> torch.nn.Module:
    from pvtlab.models import create_backbone

    return create_backbone(
        setting.name, features_only=setting.features_only, img_size=setting.image_size
    )


def attention_shapes(setting: AttentionSetting) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, queries, keys, head_dim) of each distinct attention call of `setting`'s
    model, in stage order (traced on the meta device, where every call goes to SDPA)."""
    with torch.device("meta"):
        model = _model(setting).eval()
        recorder = _RecordAttention()
        with recorder, torch.no_grad():
            model(torch.empty(setting.batch, 3, *setting.image_size))
    shapes = [(*queries[:3], keys, queries[3]) for queries, keys in recorder.shapes]
    return list(dict.fromkeys(shapes))  # one per stage: its blocks share the shape


def _time_kernels(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool, repeats: int,
    device: torch.device, kernels: dict[str, Any] = KERNELS,
) -> dict[str, float]:  # fmt: skip
    """Median seconds of each of `kernels` on (q, k, v), with the gradients of all three if
    `backward`, the kernels timed in turns."""
    inputs = [t.detach().requires_grad_(backward) for t in (q, k, v)]
    grad_out = torch.randn_like(q)

    def call(kernel: Any) -> Any:
        out = kernel(*inputs)
        return torch.autograd.grad(out, inputs, grad_out) if backward else out

    paths = {label: (lambda kernel=kernel: call(kernel)) for label, kernel in kernels.items()}
    with torch.set_grad_enabled(backward):
        return time_interleaved(paths, warmup=2, repeats=repeats, device=device)


def attention_kernels(
    setting: AttentionSetting, repeats: int, device: torch.device | None = None
) -> list[AttentionRow]:
    """Milliseconds of SDPA and of the explicit product at each stage's attention shape of
    `setting`, in fp32 and bf16, forward alone and with its backward (gradients of queries,
    keys and values); also of SDPA with the queries folded into the batch where pvtlab's
    training folds them (`backward_query_chunks`)."""
    device = device or bench_device()
    rows = []
    for stage, shape in enumerate(attention_shapes(setting), 1):
        b, heads, queries, keys, head_dim = shape
        chunks = (
            backward_query_chunks(b, heads, queries, keys, device.type)
            if device.type in FOLDING_DEVICE_TYPES
            else 1
        )
        kernels = dict(KERNELS)
        if chunks > 1:
            kernels[FOLDED] = functools.partial(query_folded_attention, chunks=chunks)
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, heads, queries, head_dim, device=device, dtype=dtype)
            k, v = (torch.randn(b, heads, keys, head_dim, device=device, dtype=dtype) for _ in "kv")
            taken = "explicit" if explicit_attention_is_faster(q, k) else "SDPA"
            if taken == "SDPA" and chunks > 1:
                taken = f"SDPA, queries in {chunks} chunks in training"
            for backward in (False, True):
                ms = {
                    label: 1000 * seconds
                    for label, seconds in _time_kernels(
                        q, k, v, backward, repeats, device, kernels
                    ).items()
                }
                dtype_name = str(dtype).removeprefix("torch.")
                rows.append(
                    AttentionRow(
                        setting,
                        stage,
                        shape,
                        dtype_name,
                        backward,
                        ms["SDPA"],
                        ms["explicit"],
                        taken,
                        ms.get(FOLDED),
                        chunks,
                    )
                )
    return rows


@contextmanager
def attention_precision(device: torch.device, bf16: bool, sdpa_only: bool) -> Iterator[None]:
    """bf16 autocast on `device` if `bf16`; SDPA for every attention call if `sdpa_only` (else
    pvtlab's choice of kernel)."""
    with (
        explicit_attention_limit(0) if sdpa_only else nullcontext(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16),
    ):
        yield


def _pass_model(
    setting: AttentionSetting, device: torch.device
) -> tuple[torch.nn.Module, torch.Tensor]:
    """`setting`'s model in training mode and a batch of random images for it."""
    torch.manual_seed(0)
    model = _model(setting).train().to(device)
    return model, torch.randn(setting.batch, 3, *setting.image_size, device=device)


def _training_pass(
    model: torch.nn.Module, x: torch.Tensor, device: torch.device, bf16: bool, sdpa_only: bool
) -> None:
    """Forward and backward of `model` on `x`, the sum of its outputs as the loss."""
    with attention_precision(device, bf16, sdpa_only):
        out = model(x)
    sum(o.float().sum() for o in (out if isinstance(out, list | tuple) else [out])).backward()
    model.zero_grad(set_to_none=True)


def training_passes(
    setting: AttentionSetting, repeats: int, device: torch.device | None = None
) -> dict[str, float]:
    """Images per second of a forward + backward pass of `setting`'s model along each of
    `PASSES`, timed in turns."""
    device = device or bench_device()
    model, x = _pass_model(setting, device)
    paths = {
        label: (lambda p=p: _training_pass(model, x, device, *p)) for label, p in PASSES.items()
    }
    seconds = time_interleaved(paths, warmup=1, repeats=repeats, device=device)
    return {label: setting.batch / s for label, s in seconds.items()}


def _pass_peak_mib(
    setting: AttentionSetting, device: torch.device, bf16: bool, sdpa_only: bool
) -> float | None:
    """Peak MiB (`PeakMemory`) of one training pass of `setting`'s model, after a small
    forward that starts the runtime up (thread pools, kernels)."""
    model, x = _pass_model(setting, device)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64, device=device))
    with PeakMemory(device) as peak:
        _training_pass(model, x, device, bf16, sdpa_only)
    return peak.mib


def training_pass_memory(
    setting: AttentionSetting, device: torch.device | None = None
) -> dict[str, float | None]:
    """Peak MiB of one forward + backward pass of `setting`'s model along each of `PASSES`.

    CPU: each pass in a fresh process whose freed tensors leave the resident set
    (`PEAK_MEMORY_ENV`), given this process's limit of the explicit product: that environment
    keeps glibc from reusing freed memory, which would lower the limit there. CUDA: in this
    process, whose peak counter is per tensor."""
    device = device or bench_device()
    if device.type == "cuda":
        return {label: _pass_peak_mib(setting, device, *p) for label, p in PASSES.items()}
    limit = cpu_explicit_attention_max_scores()
    env = {**os.environ, **PEAK_MEMORY_ENV}
    return {
        label: run_worker(
            "pvtlab.bench.attention", {"setting": list(setting), "pass": label, "limit": limit}, env
        )
        for label in PASSES
    }


def attention_section(rows: list[AttentionRow]) -> str:
    """The report's table of `attention_kernels` rows (with the folded queries' columns where
    any row timed them)."""
    folded = any(r.folded_ms is not None for r in rows)
    header = [
        "model and input",
        "stage",
        "batch x heads x queries x keys x head_dim",
        "scores",
        "dtype",
        "pass",
        "SDPA ms",
        "explicit ms",
        "explicit / SDPA time",
    ]
    if folded:
        header += ["query chunks", "SDPA, queries folded ms", "folded / SDPA time"]

    def cells(r: AttentionRow) -> tuple[Any, ...]:
        base = (
            str(r.setting),
            r.stage,
            " x ".join(map(str, r.shape)),
            f"2^{math.log2(math.prod(r.shape[:4])):.1f}",
            r.dtype,
            "forward + backward" if r.backward else "forward",
            r.sdpa_ms,
            r.explicit_ms,
            r.explicit_ms / r.sdpa_ms,
        )
        if folded:
            timed = r.folded_ms is not None
            base += (
                r.chunks,
                r.folded_ms if timed else "-",
                r.folded_ms / r.sdpa_ms if timed else "-",
            )
        return (*base, r.taken)

    return (
        "## Attention kernels (each stage's attention)\n\n"
        "SDPA (`F.scaled_dot_product_attention`) against the explicit softmax product "
        "(`pvtlab.models.attention.explicit_attention`), median of runs taken in turns. "
        "`taken`: the kernel pvtlab's attention runs there (`pvtlab.models.attention.attention`: "
        "the explicit product on the CPU in bf16 for at most "
        f"2^{math.log2(cpu_explicit_attention_max_scores()):.1f} scores in this run, where "
        f"freed memory {'is' if freed_memory_is_reused() else 'is not'} reused "
        "(`pvtlab.utils.allocator`), SDPA elsewhere"
        + (
            "; in training with the queries folded into the batch in `query chunks` chunks "
            "where SDPA's backward would be short of pieces of work, "
            "`pvtlab.models.attention.backward_query_chunks`"
            if folded
            else ""
        )
        + ").\n\n"
        + markdown_table([*header, "taken"], [cells(r) for r in rows])
    )


def training_pass_section(
    passes: dict[AttentionSetting, dict[str, float]],
    peaks: dict[AttentionSetting, dict[str, float | None]],
) -> str:
    """The report's table of `training_passes` and `training_pass_memory`, for each setting
    measured."""
    rows = []
    for setting, rates in passes.items():
        fp32 = rates[next(iter(PASSES))]
        rows += [
            (str(setting), label, rate, rate / fp32, peaks[setting][label])
            for label, rate in rates.items()
        ]
    return (
        "## Training pass by attention kernel (forward + backward)\n\n"
        "Images per second: median of passes taken in turns. Peak memory: one pass in a fresh "
        "process per row (`pvtlab.bench.attention.training_pass_memory`; on the CPU the "
        "resident-set high-water mark above the model and its inputs, glibc's mmap threshold "
        "fixed at 128 KiB so freed tensors leave the resident set, the explicit product's limit "
        "of this run passed on). `explicit_attention_max_scores=0` (src/train.py) trains with "
        "SDPA throughout, for the memory.\n\n"
        + markdown_table(["model and input", "pass", "img/s", "vs fp32", "peak MiB"], rows)
    )


def _worker(argv: list[str]) -> None:
    request = json.loads(argv[0])
    setting = AttentionSetting(*request["setting"])
    bf16, sdpa_only = PASSES[request["pass"]]
    with explicit_attention_limit(request["limit"]):
        print(json.dumps(_pass_peak_mib(setting, torch.device("cpu"), bf16, sdpa_only)))


if __name__ == "__main__":
    _worker(sys.argv[1:])
