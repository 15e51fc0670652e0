"""Softmax attention for pvtlab's transformers: SDPA, or the explicit product where it is faster.

SDPA's CPU flash kernel in bf16 trails the explicit softmax product at PVT's shapes. On the
2-core CPU (`python src/bench.py suites=[training]`, attention table, 2026-12-05 02:22 UTC) the
explicit product took 0.48-0.71x SDPA's time in the forward and 0.19-0.49x with its backward
at PVT-Small 224 x 32 (2^19-2^22 scores a call), 0.54-0.75x and 0.41-0.63x at 512 x 512,
batch 8 (2^22-2^25). That holds while freed memory is reused (`pvtlab.utils.allocator`, set by
src/train.py, src/eval.py and src/bench.py): up to 2^27 scores (stage 1 at 800 x 1333, batch 2)
it still took 0.71-0.75x and 0.57-0.72x. Under glibc's default, every score tensor above its
mmap threshold is faulted in afresh at each call, and from 2^24 scores SDPA wins (the explicit
product 1.7-1.8x its time, 1.1-1.4x with the backward). The limit below holds either way. In
fp32 neither kernel wins throughout, and SDPA, the smaller in memory, is kept.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

__all__ = [
    "CPU_EXPLICIT_ATTENTION_MAX_SCORES",
    "attention",
    "explicit_attention",
    "explicit_attention_is_faster",
    "explicit_attention_limit",
]

# The most scores for which the explicit product runs instead of SDPA (CPU, bf16); 0: SDPA always.
CPU_EXPLICIT_ATTENTION_MAX_SCORES = 2**23


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` written out (the PVT release's arithmetic), with
    dropout `dropout_p` on the weights: `F.scaled_dot_product_attention`'s result."""
    attn = ((q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5).softmax(dim=-1)
    return F.dropout(attn, dropout_p) @ v if dropout_p else attn @ v


def explicit_attention_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the explicit product beats SDPA for queries `q` and keys `k`
    (``[batch, heads, tokens, head_dim]``): on the CPU, in bf16, with at most
    `CPU_EXPLICIT_ATTENTION_MAX_SCORES` scores."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    return q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] <= CPU_EXPLICIT_ATTENTION_MAX_SCORES


@contextmanager
def explicit_attention_limit(max_scores: int) -> Iterator[None]:
    """Within this block the explicit product replaces SDPA for at most `max_scores` scores
    (0: SDPA throughout), for benchmarks and tests; the block's end restores the limit."""
    global CPU_EXPLICIT_ATTENTION_MAX_SCORES
    saved, CPU_EXPLICIT_ATTENTION_MAX_SCORES = CPU_EXPLICIT_ATTENTION_MAX_SCORES, max_scores
    try:
        yield
    finally:
        CPU_EXPLICIT_ATTENTION_MAX_SCORES = saved


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, fused: bool = True
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` over ``[batch, heads, tokens, head_dim]`` tensors:
    by SDPA if `fused`, unless `explicit_attention_is_faster`; written out otherwise."""
    if fused and not explicit_attention_is_faster(q, k):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    return explicit_attention(q, k, v, dropout_p)
