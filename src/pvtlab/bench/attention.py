"""SDPA against the explicit softmax product at the attention shapes of a PVT classifier: the
measurement behind `pvtlab.models.pvt.explicit_attention_is_faster`, which picks the explicit
product on the CPU in bf16 while the score tensor is small."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from pvtlab.bench import bench_device, markdown_table, time_interleaved

__all__ = ["AttentionRow", "attention_kernels", "attention_section", "attention_shapes"]


class AttentionRow(NamedTuple):
    stage: int
    shape: tuple[int, int, int, int, int]  # batch, heads, queries, keys, head_dim
    dtype: str
    backward: bool  # forward alone or forward + backward
    sdpa_ms: float
    explicit_ms: float
    taken: str  # the kernel `SpatialReductionAttention` runs at this shape and dtype


class _RecordAttention(TorchFunctionMode):
    """Records the (queries shape, keys count) of every SDPA call made inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[tuple[int, ...], int]] = []

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        if func is F.scaled_dot_product_attention:
            self.shapes.append((tuple(args[0].shape), args[1].shape[-2]))
        return func(*args, **(kwargs or {}))


def attention_shapes(name: str, size: int, batch: int) -> list[tuple[int, int, int, int, int]]:
    """(batch, heads, queries, keys, head_dim) of each distinct attention call, in stage order, of
    classifier `name` on a `batch` of `size` x `size` images (traced on the meta device)."""
    from pvtlab.models import create_backbone

    with torch.device("meta"):
        model = create_backbone(name, features_only=False, img_size=size).eval()
        recorder = _RecordAttention()
        with recorder, torch.no_grad():
            model(torch.empty(batch, 3, size, size))
    shapes = [(*queries[:3], keys, queries[3]) for queries, keys in recorder.shapes]
    return list(dict.fromkeys(shapes))  # one per stage: its blocks share the shape


def _time_kernels(
    kernels: dict[str, Any], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
    repeats: int, device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """Median seconds of each kernel on (q, k, v), with the gradients of all three if
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
    name: str, size: int, batch: int, repeats: int, device: torch.device | None = None
) -> list[AttentionRow]:
    """Milliseconds of SDPA and of the explicit product at each stage's attention shape of
    classifier `name`, in fp32 and bf16, forward alone and with its backward (gradients of
    queries, keys and values)."""
    from pvtlab.models.pvt import explicit_attention, explicit_attention_is_faster

    device = device or bench_device()
    kernels = {"SDPA": F.scaled_dot_product_attention, "explicit": explicit_attention}
    rows = []
    for stage, shape in enumerate(attention_shapes(name, size, batch), 1):
        b, heads, queries, keys, head_dim = shape
        for dtype in (torch.float32, torch.bfloat16):
            q = torch.randn(b, heads, queries, head_dim, device=device, dtype=dtype)
            k, v = (torch.randn(b, heads, keys, head_dim, device=device, dtype=dtype) for _ in "kv")
            taken = "explicit" if explicit_attention_is_faster(q, k) else "SDPA"
            for backward in (False, True):
                seconds = _time_kernels(kernels, q, k, v, backward, repeats, device)
                dtype_name = str(dtype).removeprefix("torch.")
                sdpa_ms, explicit_ms = 1000 * seconds["SDPA"], 1000 * seconds["explicit"]
                rows.append(
                    AttentionRow(stage, shape, dtype_name, backward, sdpa_ms, explicit_ms, taken)
                )
    return rows


def attention_section(rows: list[AttentionRow], name: str, size: int, batch: int) -> str:
    """The report's table of `attention_kernels` rows."""
    return (
        f"## Attention kernels ({name}, {size}x{size}, batch {batch}: each stage's attention)\n\n"
        "SDPA (`F.scaled_dot_product_attention`) against the explicit softmax product "
        "(`pvtlab.models.pvt.explicit_attention`), median of runs taken in turns. "
        "`taken`: the kernel `SpatialReductionAttention` runs there with `fused_attn=True` "
        "(the explicit product on the CPU in bf16 for at most "
        "`CPU_EXPLICIT_ATTENTION_MAX_SCORES` scores, `pvtlab.models.pvt`).\n\n"
        + markdown_table(
            [
                "stage",
                "batch x heads x queries x keys x head_dim",
                "dtype",
                "pass",
                "SDPA ms",
                "explicit ms",
                "explicit / SDPA time",
                "taken",
            ],
            [
                (
                    r.stage,
                    " x ".join(map(str, r.shape)),
                    r.dtype,
                    "forward + backward" if r.backward else "forward",
                    r.sdpa_ms,
                    r.explicit_ms,
                    r.explicit_ms / r.sdpa_ms,
                    r.taken,
                )
                for r in rows
            ],
        )
    )
