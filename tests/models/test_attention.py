"""Attention: SDPA, or the written-out softmax product when a model is built with
`fused_attn=False`; the heads' masked attention as SDPA's."""

from __future__ import annotations

from unittest import mock

import pytest
import timm
import torch
import torch.nn.functional as F

import pvtlab  # noqa: F401  (registers the models)
from pvtlab.models.heads.detr import Attention as DetrAttention
from pvtlab.models.heads.trans2seg import SelfAttention
from pvtlab.models.pvt import SpatialReductionAttention


def _attention_modules(model: torch.nn.Module) -> list[SpatialReductionAttention]:
    return [m for m in model.modules() if isinstance(m, SpatialReductionAttention)]


def _output_and_gradients(
    module: torch.nn.Module, x: torch.Tensor, *args: object
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.clone().requires_grad_()
    out = module(x, *args)
    out.square().mean().backward()
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return out.detach(), grads


@pytest.mark.parametrize("sr_ratio", [1, 4])
def test_fused_and_explicit_attention_give_the_same_output_and_gradients(sr_ratio: int) -> None:
    torch.manual_seed(0)
    fused = SpatialReductionAttention(64, num_heads=2, sr_ratio=sr_ratio, fused_attn=True)
    explicit = SpatialReductionAttention(64, num_heads=2, sr_ratio=sr_ratio, fused_attn=False)
    explicit.load_state_dict(fused.state_dict())
    x, size = torch.randn(2, 10 * 13, 64), (10, 13)  # a grid the reduction pads
    out, grads = _output_and_gradients(fused, x, size)
    expected, expected_grads = _output_and_gradients(explicit, x, size)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)
    assert len(grads) == len(expected_grads)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fused", [True, False])
def test_fused_flag_chooses_the_kernel(fused: bool) -> None:
    layer = SpatialReductionAttention(32, num_heads=2, sr_ratio=2, fused_attn=fused).eval()
    with (
        mock.patch.object(F, "scaled_dot_product_attention", wraps=F.scaled_dot_product_attention)
        as sdpa,
        torch.no_grad(),
    ):  # fmt: skip
        layer(torch.randn(1, 64, 32), (8, 8))
    assert sdpa.call_count == (1 if fused else 0)


def test_fused_flag_reaches_every_block_from_the_model_constructor() -> None:
    with torch.device("meta"):  # the modules' settings only
        default = timm.create_model("pvt_tiny")
        explicit = timm.create_model("pvt_tiny", fused_attn=False)
        features = timm.create_model("pvt_tiny", features_only=True, fused_attn=False)
    for model in (default, explicit, features):
        assert len(_attention_modules(model)) == 8  # two blocks in each of four stages
    assert all(m.fused_attn for m in _attention_modules(default))
    assert not any(m.fused_attn for m in _attention_modules(explicit))
    assert not any(m.fused_attn for m in _attention_modules(features))


def test_attention_dropout_acts_in_training_only_on_both_paths() -> None:
    torch.manual_seed(0)
    x, size = torch.randn(2, 64, 32), (8, 8)
    for fused in (True, False):
        layer = SpatialReductionAttention(32, num_heads=2, attn_drop=0.5, fused_attn=fused)
        with torch.no_grad():
            assert torch.equal(layer.eval()(x, size), layer(x, size))
            assert not torch.allclose(layer.train()(x, size), layer.eval()(x, size))


def _masked_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """The written-out product with the keys where `keep` is False left out."""
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1) @ v


def test_detr_attention_ignores_padded_keys_as_the_written_out_product() -> None:
    torch.manual_seed(0)
    layer = DetrAttention(64, num_heads=4).eval()
    query, key = torch.randn(2, 5, 64), torch.randn(2, 12, 64)
    padding = torch.zeros(2, 12, dtype=torch.bool)
    padding[1, 8:] = True
    moved = key.clone()
    moved[1, 8:] += 10.0  # only padded keys change
    with torch.no_grad():
        out = layer(query, key, key, padding)
        out_moved = layer(query, moved, moved, padding)
        unmasked = layer(query, moved, moved)
        heads = [
            layer._heads(proj(t)) for proj, t in ((layer.q, query), (layer.k, key), (layer.v, key))
        ]
        reference = _masked_reference(*heads, ~padding[:, None, None, :])
        reference = layer.proj(reference.transpose(1, 2).reshape(2, 5, 64))
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(out_moved, out)
    assert not torch.allclose(unmasked[1], out[1], atol=1e-3)  # the mask did act


def test_trans2seg_self_attention_is_the_softmax_product() -> None:
    torch.manual_seed(0)
    layer = SelfAttention(64, num_heads=2).eval()
    x = torch.randn(2, 16, 64)
    with torch.no_grad():
        q, k, v = layer.qkv(x).reshape(2, 16, 3, 2, 32).permute(2, 0, 3, 1, 4)
        reference = _masked_reference(q, k, v, torch.ones(16, 16, dtype=torch.bool))
        reference = layer.proj(reference.transpose(1, 2).reshape(2, 16, 64))
        torch.testing.assert_close(layer(x), reference, atol=1e-5, rtol=0)
