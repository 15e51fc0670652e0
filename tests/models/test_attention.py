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
    attention,
    cpu_explicit_attention_max_scores,
    explicit_attention_is_faster,
    explicit_attention_limit,
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
