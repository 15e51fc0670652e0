"""pvtlab's attention: SDPA, or the explicit product on the CPU in bf16 while the scores are few."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

import pvtlab  # noqa: F401  (registers the models)
import pvtlab.models.attention as attention_module
from pvtlab.models.attention import (
    CPU_EXPLICIT_ATTENTION_MAX_SCORES,
    GPU_BACKWARD_BLOCKS,
    attention,
    backward_query_chunks,
    cpu_explicit_attention_max_scores,
    explicit_attention_is_faster,
    explicit_attention_limit,
    query_folded_attention,
    set_explicit_attention_limit,
)
from pvtlab.models.heads.detr import Attention as DetrAttention
from pvtlab.models.heads.trans2seg import SelfAttention
from pvtlab.models.pvt import SpatialReductionAttention


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("pvt_tiny").eval()


def test_explicit_product_equals_sdpa_in_fp32() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 2, 196, 64)  # batch x heads x queries x head_dim; 49 keys, as SRA's
    k, v = torch.randn(2, 2, 49, 64), torch.randn(2, 2, 49, 64)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(attention(q, k, v, fused=False), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(attention(q, k, v), expected)  # fp32: SDPA itself


def test_explicit_product_applies_boolean_and_additive_masks_as_sdpa() -> None:
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 10, 32), torch.randn(2, 4, 12, 32), torch.randn(2, 4, 12, 32)
    keep = torch.ones(2, 1, 1, 12, dtype=torch.bool)
    keep[0, ..., 7:] = False  # the first image's last five keys are padding
    additive = torch.randn(2, 4, 10, 12)
    for mask in (keep, additive):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        explicit = attention(q, k, v, fused=False, attn_mask=mask)
        torch.testing.assert_close(explicit, expected, atol=1e-5, rtol=0)
    unmasked = attention(q, k, v, fused=False)
    assert not torch.allclose(unmasked[0], expected[0], atol=1e-3)  # the mask did act


def test_limit_holds_inside_the_block_and_is_restored_after_an_error() -> None:
    default = cpu_explicit_attention_max_scores()
    with pytest.raises(RuntimeError), explicit_attention_limit(0):
        assert cpu_explicit_attention_max_scores() == 0
        raise RuntimeError
    assert cpu_explicit_attention_max_scores() == default


def test_set_limit_holds_until_reset_and_rejects_what_is_not_a_count() -> None:
    default = cpu_explicit_attention_max_scores()
    try:
        set_explicit_attention_limit(2**20)
        with explicit_attention_limit(0):  # a block inside restores the set limit, not None
            assert cpu_explicit_attention_max_scores() == 0
        assert cpu_explicit_attention_max_scores() == 2**20
        for bad in (-1, 1.5e7, "2**20", True):
            with pytest.raises(ValueError, match="explicit_attention_max_scores") as error:
                set_explicit_attention_limit(bad)  # type: ignore[arg-type]
            assert repr(bad) in str(error.value)
        assert cpu_explicit_attention_max_scores() == 2**20  # a rejected value changes nothing
    finally:
        set_explicit_attention_limit(None)
    assert cpu_explicit_attention_max_scores() == default


@contextmanager
def _counting_sdpa(bf16: bool) -> Iterator[mock.MagicMock]:
    """Inference (no grad), in bf16 autocast on the CPU if `bf16`, with SDPA's calls counted by
    the mock this yields."""
    with (
        mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention)
        as sdpa,
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):  # fmt: skip
        yield sdpa


def _takes_explicit(queries: tuple, keys: tuple, dtype: torch.dtype = torch.bfloat16) -> bool:
    """`explicit_attention_is_faster` for tensors of these shapes (CPU; one element allocated)."""
    q, k = (torch.zeros(1, dtype=dtype).expand(shape) for shape in (queries, keys))
    return explicit_attention_is_faster(q, k)


@pytest.mark.parametrize("reused", [True, False])
def test_limit_depends_on_whether_freed_memory_is_reused(reused: bool) -> None:
    with mock.patch.object(attention_module, "freed_memory_is_reused", return_value=reused):
        assert cpu_explicit_attention_max_scores() == (
            CPU_EXPLICIT_ATTENTION_MAX_SCORES if reused else 2**23
        )
        assert _takes_explicit((2, 1, 256, 64), (2, 1, 16, 64))  # 2^13 scores
        # 512 x 512, batch 8, stage 1: 2^25 scores
        assert _takes_explicit((8, 1, 16384, 64), (8, 1, 256, 64)) is reused
        # 800 x 1333, batch 4, stage 1: 2^28.1 scores
        assert not _takes_explicit((4, 1, 66600, 64), (4, 1, 1050, 64))
        assert not _takes_explicit((2, 1, 256, 64), (2, 1, 16, 64), torch.float32)


def test_detr_attention_takes_the_choice_and_ignores_padded_keys() -> None:
    torch.manual_seed(0)
    layer = DetrAttention(64, num_heads=4).eval()
    query, key = torch.randn(2, 5, 64), torch.randn(2, 12, 64)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    moved = key.clone()
    moved[1, 8:] += 10.0  # only padded keys change
    with _counting_sdpa(bf16=True) as sdpa:
        explicit = layer(query, key, key, padding)
        explicit_moved = layer(query, moved, moved, padding)
        assert sdpa.call_count == 0
        with explicit_attention_limit(0):
            fused = layer(query, key, key, padding)
        assert sdpa.call_count == 1
    torch.testing.assert_close(explicit_moved, explicit)
    torch.testing.assert_close(explicit.float(), fused.float(), atol=0.05, rtol=0.05)


def test_trans2seg_self_attention_takes_the_same_choice() -> None:
    layer = SelfAttention(64, num_heads=2).eval()
    x = torch.randn(2, 16, 64)
    with _counting_sdpa(bf16=True) as sdpa:
        explicit = layer(x)
        with explicit_attention_limit(0):
            fused = layer(x)
    assert sdpa.call_count == 1  # the second call only
    torch.testing.assert_close(explicit.float(), fused.float(), atol=0.05, rtol=0.05)


def _sdpa_calls(model: torch.nn.Module, x: torch.Tensor, bf16: bool, explicit_max: int) -> int:
    """How many attention calls of `model(x)` went to SDPA, with the explicit product allowed
    up to `explicit_max` scores."""
    with explicit_attention_limit(explicit_max), _counting_sdpa(bf16) as sdpa:
        model(x)
    return sdpa.call_count


def test_cpu_bf16_attention_is_explicit_only_while_the_scores_are_few(
    tiny: torch.nn.Module,
) -> None:
    # batch x heads x queries x keys: 2 x 1 x 256 x 4, 2 x 2 x 64 x 4, 2 x 5 x 16 x 4 and, with
    # the class token, 2 x 8 x 5 x 5 = 400 scores in stage 4 (two blocks a stage)
    x = torch.randn(2, 3, 64, 64)
    blocks = sum(isinstance(m, SpatialReductionAttention) for m in tiny.modules())  # 8
    assert _sdpa_calls(tiny, x, bf16=True, explicit_max=2**23) == 0
    assert _sdpa_calls(tiny, x, bf16=True, explicit_max=400) == 6  # stage 4 still explicit
    assert _sdpa_calls(tiny, x, bf16=True, explicit_max=399) == blocks
    assert _sdpa_calls(tiny, x, bf16=False, explicit_max=2**23) == blocks  # fp32: SDPA


def test_cpu_bf16_explicit_attention_matches_sdpa(tiny: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 97, 131)
    outputs = []
    for explicit_max in (2**23, 0):
        with (
            explicit_attention_limit(explicit_max),
            torch.no_grad(),
            torch.autocast("cpu", dtype=torch.bfloat16),
        ):
            outputs.append(tiny(x).float())
    explicit, sdpa = outputs
    torch.testing.assert_close(explicit, sdpa, atol=0.05, rtol=0.05)
    assert (explicit - sdpa).abs().max() > 0  # the two kernels did run: bf16 rounds them apart


# ------------------------------------------------ queries folded into the batch (GPU backward)


@pytest.mark.parametrize("chunks", [1, 3, 8])
def test_folded_queries_give_sdpa_result_and_gradients(chunks: int) -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 3, 101, 16, requires_grad=True)  # 101 queries: padded to the chunks
    k, v = (torch.randn(2, 3, 20, 16, requires_grad=True) for _ in "kv")
    grad = torch.randn(2, 3, 101, 16)
    expected = F.scaled_dot_product_attention(q, k, v)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    folded = query_folded_attention(q, k, v, chunks)
    torch.testing.assert_close(folded, expected)
    for got, want in zip(torch.autograd.grad(folded, (q, k, v), grad), expected_grads, strict=True):
        torch.testing.assert_close(got, want)


def test_backward_chunks_spread_few_keys_and_heads_over_the_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # PVT-Small at 800 x 1333, batch 1: stage 1 has 1 head, 66800 queries, 1050 keys (9 blocks)
    chunks = backward_query_chunks(1, 1, 66800, 1050)
    assert chunks == 32 and 9 * chunks >= GPU_BACKWARD_BLOCKS
    assert backward_query_chunks(2, 1, 66800, 1050) == 16  # twice the batch, half the chunks
    assert backward_query_chunks(1, 8, 1050, 1050) == 1  # stage 4: too few queries to cut
    assert backward_query_chunks(32, 1, 3136, 49) == 2  # 224 x 32: chunks keep 1024 queries
    assert backward_query_chunks(64, 8, 66800, 4096) == 1  # enough blocks already
    # The CPU shares the backward out by batch x heads, one a thread.
    monkeypatch.setattr(attention_module, "_cpu_threads", lambda: 8)
    assert backward_query_chunks(1, 1, 66800, 1050, "cpu") == 8
    assert backward_query_chunks(2, 2, 16700, 1050, "cpu") == 2
    assert backward_query_chunks(8, 1, 66800, 1050, "cpu") == 1


def test_queries_fold_only_for_the_backward_and_folding_keeps_outputs_and_gradients(
    tiny: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(attention_module, "_cpu_threads", lambda: 4)
    q, k = torch.randn(1, 1, 5000, 64), torch.randn(1, 1, 80, 64)
    assert attention_module._chunks_for_backward(q, k) == 1  # no gradient: nothing to spread
    q.requires_grad_()
    assert attention_module._chunks_for_backward(q, k) == 4
    with attention_module.query_folding(False):
        assert attention_module._chunks_for_backward(q, k) == 1
    assert attention_module._chunks_for_backward(q, k) == 4  # restored

    x = torch.randn(1, 3, 128, 160)

    def outputs_and_gradients() -> tuple[torch.Tensor, list[torch.Tensor]]:
        tiny.zero_grad(set_to_none=True)
        out = tiny.forward_features(x)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in tiny.parameters() if p.grad is not None]

    with attention_module.query_folding(False):
        plain = outputs_and_gradients()
    folded_calls = []

    def folded(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, chunks: int, dropout_p=0.0):
        folded_calls.append(chunks)
        return query_folded_attention(q, k, v, chunks, dropout_p)

    monkeypatch.setattr(attention_module, "_chunks_for_backward", lambda q, k: 4)
    monkeypatch.setattr(attention_module, "query_folded_attention", folded)
    folded_out = outputs_and_gradients()
    assert folded_calls == [4] * 8  # every block of the four stages
    torch.testing.assert_close(folded_out[0], plain[0])
    for got, want in zip(folded_out[1], plain[1], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_folding_compiles_into_one_graph() -> None:
    """`torch.compile(fullgraph=True)` traces the folded path, the CPU's thread count read once
    at tracing (dynamo cannot trace `torch.get_num_threads`)."""
    torch.manual_seed(0)
    layer = SpatialReductionAttention(32, num_heads=1, sr_ratio=8)
    x = torch.randn(1, 64 * 64, 32, requires_grad=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # one image, one head: half the CPU's threads idle in the backward
    try:
        q = torch.randn(1, 1, 64 * 64, 32, requires_grad=True)
        assert attention_module._chunks_for_backward(q, torch.randn(1, 1, 64, 32)) == 2
        compiled = torch.compile(layer, fullgraph=True)
        out = compiled(x, (64, 64))
        (grad,) = torch.autograd.grad(out.square().sum(), x)
        with attention_module.query_folding(False):
            expected = layer(x, (64, 64))
            (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(grad, expected_grad, atol=1e-4, rtol=1e-4)
