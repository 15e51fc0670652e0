"""Softmax attention for pvtlab's transformers: SDPA, or the explicit product where it is faster.

SDPA's CPU flash kernel in bf16 trails the explicit softmax product at the shapes of PVT's
spatial-reduction attention. On the 2-core CPU (`python src/bench.py suites=[training]`,
attention table, 2026-12-05 02:22 UTC) the explicit product took 0.48-0.71x SDPA's time in the
forward and 0.19-0.49x with its backward at PVT-Small 224 x 32 (2^19-2^22 scores a call), and
0.54-0.75x and 0.41-0.63x at 512 x 512, batch 8 (2^22-2^25).

How far that holds depends on the host allocator. While freed memory is reused
(`pvtlab.utils.allocator.reuse_freed_memory`, set by src/train.py, src/eval.py and
src/bench.py), the explicit product still won at stage 1 of PVT at 800 x 1333 with batch 2
(2 x 1 x 66600 x 1050, 2^27.1 scores: 0.73-0.76x in the forward, 0.71-0.72x with the backward)
and batch 3 (2^27.6: 0.74x, 0.63x), and lost with batch 4 (2^28.1: 0.74x in the forward but
1.12x with the backward, whose time jumped 2.4x from batch 3 where SDPA's grew 1.3x), so its
limit there is `CPU_EXPLICIT_ATTENTION_MAX_SCORES`, 3 x 2^26 (2^27.6, a 384 MiB score tensor in
bf16). The jump is the allocator's, not the kernels' (2026-12-05 10:33 UTC): each op of
the forward and backward took 1.15-1.55x longer at batch 4 than 3; forward + backward at batch 4
took 0.98-1.04 s (SDPA 1.33-1.39 s) in a fresh process, up to 1.18 s in one that had run batch 3
first, where a call page-faulted up to 270k fresh pages (1 GiB) as the heap grew around freed
blocks. Stages 2 and 3 at 800 x 1333 (2026-12-05 06:40 UTC) agree:
the explicit product won up to 2^27.6 (0.75-0.76x SDPA's time, with the backward 0.66-0.69x)
and from 2^28 won or lost by shape (with the backward 0.68x at 8 x 2 x 16700 x 1050, 1.00x at
12 x 5 x 4200 x 1050, 0.96x at 16 x 5 x 4200 x 1050). Under glibc's default, every score tensor
above the mmap threshold is faulted in afresh at each call, and from 2^24 scores SDPA wins (the
explicit product 1.7-1.8x its time, 1.1-1.4x with the backward): the limit is then
`CPU_EXPLICIT_ATTENTION_MAX_SCORES_FRESH_MEMORY`. In fp32 neither kernel wins throughout, and
SDPA, the smaller in memory, is kept. (Kernel timings: `pvtlab.bench.attention._time_kernels`,
3 runs after 2 warm-ups, one process each.)

The speed costs memory in training: the explicit product keeps its score tensor for the
backward, SDPA only a log-sum-exp per query. A run sets its own limit with the
`explicit_attention_max_scores` key of src/train.py and src/eval.py
(`set_explicit_attention_limit`; 0: SDPA throughout).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from pvtlab.utils.allocator import freed_memory_is_reused

__all__ = [
    "CPU_EXPLICIT_ATTENTION_MAX_SCORES",
    "CPU_EXPLICIT_ATTENTION_MAX_SCORES_FRESH_MEMORY",
    "attention",
    "cpu_explicit_attention_max_scores",
    "explicit_attention",
    "explicit_attention_is_faster",
    "explicit_attention_limit",
    "set_explicit_attention_limit",
]

# The most scores (batch x heads x queries x keys) a call for which the explicit product runs
# instead of SDPA on the CPU in bf16: while freed memory is reused, and otherwise.
CPU_EXPLICIT_ATTENTION_MAX_SCORES = 3 * 2**26
CPU_EXPLICIT_ATTENTION_MAX_SCORES_FRESH_MEMORY = 2**23
# The limit set by `set_explicit_attention_limit` (the `explicit_attention_max_scores` key of
# src/train.py and src/eval.py) or by `explicit_attention_limit`'s block; None: the two above.
_limit_override: int | None = None


def cpu_explicit_attention_max_scores() -> int:
    """The most scores a call for which the explicit product replaces SDPA (CPU, bf16) now."""
    if _limit_override is not None:
        return _limit_override
    if freed_memory_is_reused():
        return CPU_EXPLICIT_ATTENTION_MAX_SCORES
    return CPU_EXPLICIT_ATTENTION_MAX_SCORES_FRESH_MEMORY


def explicit_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` written out (the PVT release's arithmetic), with
    dropout `dropout_p` on the weights: `F.scaled_dot_product_attention`'s result, `attn_mask`
    included (boolean: True where a query attends to a key; else added to the scores)."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    attn = scores.softmax(dim=-1)
    return F.dropout(attn, dropout_p) @ v if dropout_p else attn @ v


def explicit_attention_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether the explicit product beats SDPA for queries `q` and keys `k`
    (``[batch, heads, tokens, head_dim]``): on the CPU, in bf16, with at most
    `cpu_explicit_attention_max_scores()` scores."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16:
        return False
    scores = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2]
    return scores <= cpu_explicit_attention_max_scores()


def set_explicit_attention_limit(max_scores: int | None) -> None:
    """From now on the explicit product replaces SDPA (CPU, bf16) for at most `max_scores`
    scores a call. 0 keeps SDPA throughout, the least memory in training: the explicit product
    keeps its score tensor for the backward, SDPA only a log-sum-exp per query. None restores
    `cpu_explicit_attention_max_scores`' own limit for the host allocator."""
    if max_scores is not None and (
        isinstance(max_scores, bool) or not isinstance(max_scores, int) or max_scores < 0
    ):
        raise ValueError(
            "explicit_attention_max_scores must be null (pvtlab's limit) or a whole number of "
            f"scores >= 0 (0: SDPA throughout); got {max_scores!r}"
        )
    global _limit_override
    _limit_override = max_scores


@contextmanager
def explicit_attention_limit(max_scores: int | None) -> Iterator[None]:
    """Within this block the explicit product replaces SDPA for at most `max_scores` scores
    (0: SDPA throughout; None: pvtlab's limit), for benchmarks and tests; the block's end
    restores the limit."""
    saved = _limit_override
    set_explicit_attention_limit(max_scores)
    try:
        yield
    finally:
        set_explicit_attention_limit(saved)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    fused: bool = True,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` over ``[batch, heads, tokens, head_dim]`` tensors,
    `attn_mask` as SDPA's: by SDPA if `fused`, unless `explicit_attention_is_faster`; written
    out otherwise."""
    if fused and not explicit_attention_is_faster(q, k):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return explicit_attention(q, k, v, dropout_p, attn_mask)
