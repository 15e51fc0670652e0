"""pvtlab's attention: SDPA, or the explicit product on the CPU in bf16 while the scores are few."""

from __future__ import annotations

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
    explicit_attention_limit,
)
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


def test_limit_holds_inside_the_block_and_is_restored_after_an_error() -> None:
    with pytest.raises(RuntimeError), explicit_attention_limit(0):
        assert attention_module.CPU_EXPLICIT_ATTENTION_MAX_SCORES == 0
        raise RuntimeError
    assert attention_module.CPU_EXPLICIT_ATTENTION_MAX_SCORES == CPU_EXPLICIT_ATTENTION_MAX_SCORES


def test_trans2seg_self_attention_takes_the_same_choice() -> None:
    layer = SelfAttention(64, num_heads=2).eval()
    x = torch.randn(2, 16, 64)
    with (
        mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention)
        as sdpa,
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16),
    ):  # fmt: skip
        explicit = layer(x)
        with explicit_attention_limit(0):
            fused = layer(x)
    assert sdpa.call_count == 1  # the second call only
    torch.testing.assert_close(explicit.float(), fused.float(), atol=0.05, rtol=0.05)


def _sdpa_calls(model: torch.nn.Module, x: torch.Tensor, bf16: bool, explicit_max: int) -> int:
    """How many attention calls of `model(x)` went to SDPA, with the explicit product allowed
    up to `explicit_max` scores."""
    with (
        explicit_attention_limit(explicit_max),
        mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention)
        as sdpa,
        torch.no_grad(),
        torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
    ):  # fmt: skip
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
