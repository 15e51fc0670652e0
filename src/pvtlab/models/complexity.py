"""Counting compute the way the paper does: multiply-accumulates, attention products included.

``torch.utils.flop_counter.FlopCounterMode`` counts 2 FLOPs per MAC for convolutions and matrix
products, and has formulas for the CUDA attention kernels, but not for the CPU kernel that
``scaled_dot_product_attention`` dispatches to (it would count 0). :func:`count_macs` registers
the same formula for that kernel, so the attention products (QK^T and AV) are counted on every
device. Element-wise work (norms, softmax, GELU, additions) is not counted, as in the paper.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["count_gmacs", "count_macs"]


def _sdpa_cpu_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_cpu_backward_flop(
    grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs
) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


_aten = torch.ops.aten
_CUSTOM_FORMULAS = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flop
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    _CUSTOM_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = (
        _sdpa_cpu_backward_flop
    )


def count_macs(
    model: nn.Module,
    input_size: Sequence[int],
    *,
    batch_size: int = 1,
    device: torch.device | str | None = None,
) -> int:
    """Multiply-accumulates of one forward pass of `model` (eval mode, no grad).

    Args:
        model: any module taking an image batch.
        input_size: ``(H, W)`` or ``(C, H, W)``; C defaults to 3.
        batch_size: images per batch (the count covers the whole batch).
        device: where to run; defaults to the model's device.
    """
    size = tuple(int(s) for s in input_size)
    if len(size) == 2:
        size = (3, *size)
    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else "cpu"
    x = torch.randn(batch_size, *size, device=device)
    was_training = model.training
    model.eval()
    # FlopCounterMode's module tracker hooks the gradient of every module input that requires
    # one, which fails for a parameter passed into a submodule (DETR's queries): count frozen.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM_FORMULAS)
        for p in trainable:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
        for p in trainable:
            p.requires_grad_(True)
    return counter.get_total_flops() // 2


def count_gmacs(model: nn.Module, input_size: Sequence[int], **kwargs) -> float:
    """:func:`count_macs` in units of 1e9 (the paper's "GFLOPs")."""
    return count_macs(model, input_size, **kwargs) / 1e9
