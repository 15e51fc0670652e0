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

SDPA's backward kernels share their work out coarsely. On a GPU (flash and memory-efficient)
by blocks of keys, times batch and heads, each block looping over every query: PVT's early
stages have one or two heads and, after the spatial reduction, about a thousand keys for tens of
thousands of queries, so stage 1 at 800 x 1333, batch 1, gives 9 blocks of work to a GPU with
132 multiprocessors, and the H200 run (experiments/gpu_h200.md) saw SDPA's forward + backward
there at 0.45x the explicit product's speed, while its forward alone was faster. On the CPU by
batch times heads, one a thread: at batch 1, stage 1 runs its backward on one core. Queries
attend independently, so `attention` cuts them into chunks that become batch entries (keys and
values repeated, their gradients summed back through the repeat) until the backward has enough
pieces of work (`backward_query_chunks`; `query_folding(False)` turns it off): the same
arithmetic, spread over the device. On the 2-core CPU (2026-12-06, 03:05 UTC) stage 1's kernel
at 800 x 1333, batch 1 (1 x 1 x 66800 x 1050 x 64) took 379 -> 309 ms in its backward in fp32,
385 -> 275 ms in bf16, two chunks against none; at batch 2, or stage 2 (two heads), nothing
changed. On a GPU the remedy is derived from the kernels' launch grids and not yet measured:
`python src/bench.py suites=[training]` there times it against plain SDPA in the attention
table.
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
    "FOLDING_DEVICE_TYPES",
    "GPU_BACKWARD_BLOCKS",
    "attention",
    "backward_query_chunks",
    "cpu_explicit_attention_max_scores",
    "explicit_attention",
    "explicit_attention_is_faster",
    "explicit_attention_limit",
    "query_folded_attention",
    "query_folding",
    "set_explicit_attention_limit",
]

# The most scores (batch x heads x queries x keys) a call for which the explicit product runs
# instead of SDPA on the CPU in bf16: while freed memory is reused, and otherwise.
CPU_EXPLICIT_ATTENTION_MAX_SCORES = 3 * 2**26
CPU_EXPLICIT_ATTENTION_MAX_SCORES_FRESH_MEMORY = 2**23
# The limit set by `set_explicit_attention_limit` (the `explicit_attention_max_scores` key of
# src/train.py and src/eval.py) or by `explicit_attention_limit`'s block; None: the two above.
_limit_override: int | None = None

# Blocks of work wanted in SDPA's GPU backward: about twice the multiprocessors of the largest
# GPUs (132 on an H100 or H200). The flash and memory-efficient kernels take keys 64 or 128 at a
# time; counting by 128 errs towards more chunks.
GPU_BACKWARD_BLOCKS = 256
_KEY_BLOCK = 128
# The fewest queries a chunk keeps: below that a chunk's loop is too short to pay for its
# share of loading the keys.
_MIN_QUERIES_PER_CHUNK = 1024
_fold_queries = True  # `query_folding`'s setting
# The devices whose SDPA backward `backward_query_chunks` knows how to spread.
FOLDING_DEVICE_TYPES = ("cuda", "cpu")


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


@torch.compiler.assume_constant_result  # read when traced: dynamo cannot trace the call
def _cpu_threads() -> int:
    return torch.get_num_threads()


def backward_query_chunks(
    batch: int, heads: int, queries: int, keys: int, device_type: str = "cuda"
) -> int:
    """Into how many chunks to cut the queries so that SDPA's backward has enough pieces of
    work: on a GPU, blocks of keys times batch and heads, about `GPU_BACKWARD_BLOCKS`; on the
    CPU, batch times heads, one a thread (`torch.get_num_threads()`). A power of two; 1 where
    the batch and heads already give enough or where chunks would fall under
    `_MIN_QUERIES_PER_CHUNK` queries."""
    if device_type == "cuda":
        pieces, wanted = batch * heads * -(-keys // _KEY_BLOCK), GPU_BACKWARD_BLOCKS
    else:
        pieces, wanted = batch * heads, _cpu_threads()
    chunks = 1
    while pieces * chunks < wanted and queries // (2 * chunks) >= _MIN_QUERIES_PER_CHUNK:
        chunks *= 2
    return chunks


def query_folded_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int, dropout_p: float = 0.0
) -> torch.Tensor:
    """SDPA with the queries cut into `chunks` chunks that become batch entries, each attending
    to all the keys: the same result as one call, with `chunks` times the blocks of work in the
    backward. The queries are padded to a multiple of `chunks`; the padding's outputs are
    dropped, so it gets no gradient."""
    batch, heads, queries, head_dim = q.shape
    per_chunk = -(-queries // chunks)
    q = F.pad(q, (0, 0, 0, per_chunk * chunks - queries))
    # [B, H, C * n, d] -> [B * C, H, n, d], chunk-major within each image
    q = q.reshape(batch, heads, chunks, per_chunk, head_dim).transpose(1, 2)
    q = q.reshape(batch * chunks, heads, per_chunk, head_dim)

    def repeat(t: torch.Tensor) -> torch.Tensor:
        return t.unsqueeze(1).expand(-1, chunks, -1, -1, -1).reshape(batch * chunks, *t.shape[1:])

    out = F.scaled_dot_product_attention(q, repeat(k), repeat(v), dropout_p=dropout_p)
    out = out.reshape(batch, chunks, heads, per_chunk, head_dim).transpose(1, 2)
    return out.reshape(batch, heads, chunks * per_chunk, head_dim)[:, :, :queries]


@contextmanager
def query_folding(enabled: bool) -> Iterator[None]:
    """Within this block `attention` folds queries into the batch for the backward's sake
    (`enabled`, the default) or calls SDPA as it is, for benchmarks and tests."""
    global _fold_queries
    saved, _fold_queries = _fold_queries, enabled
    try:
        yield
    finally:
        _fold_queries = saved


def _chunks_for_backward(q: torch.Tensor, k: torch.Tensor) -> int:
    """`backward_query_chunks` where SDPA's backward will run (queries that need a gradient, on a
    GPU or the CPU), else 1."""
    if not (_fold_queries and q.requires_grad and q.device.type in FOLDING_DEVICE_TYPES):
        return 1
    batch, heads, queries, _ = q.shape
    return backward_query_chunks(batch, heads, queries, k.shape[2], q.device.type)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    fused: bool = True,
    attn_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T / sqrt(head_dim)) v`` over ``[batch, heads, tokens, head_dim]`` tensors,
    `attn_mask` as SDPA's: by SDPA if `fused` (in training with the queries folded into the
    batch where its backward would be short of work: `backward_query_chunks`), unless
    `explicit_attention_is_faster`; written out otherwise."""
    if fused and not explicit_attention_is_faster(q, k):
        chunks = 1 if attn_mask is not None else _chunks_for_backward(q, k)
        if chunks > 1:
            return query_folded_attention(q, k, v, chunks, dropout_p)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    return explicit_attention(q, k, v, dropout_p, attn_mask)
