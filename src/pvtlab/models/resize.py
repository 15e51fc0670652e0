"""Bilinear resizing that stays ATen's kernels, forward and backward, under `torch.compile`.

Inductor decomposes `F.interpolate(..., mode="bilinear")` into gathers before autograd, so the
compiled backward is their gradient, a scatter-add, which its CPU code runs far slower than ATen's
backward kernel: in the compiled Trans2Seg shapes step one such fused kernel took 21.6 ms where
eager's whole upsampling backward took 7. Registered as custom operators, the resize and its
gradient are single opaque calls in a compiled graph; in eager they are ATen's calls, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Upsample2x", "resize_bilinear"]


def resize_bilinear(x: Tensor, size: Sequence[int]) -> Tensor:
    """`F.interpolate(x, size, mode="bilinear", align_corners=False)` of a `(B, C, H, W)` map, as
    one operator that `torch.compile` leaves to ATen's kernels (gradient included)."""
    return _resize(x, list(size))


class Upsample2x(nn.Module):
    """`nn.Upsample(scale_factor=2, mode="bilinear")` through `resize_bilinear`."""

    def forward(self, x: Tensor) -> Tensor:
        return resize_bilinear(x, [2 * x.shape[-2], 2 * x.shape[-1]])


def _memory_format(x: Tensor) -> torch.memory_format:
    """The layout ATen's upsampling kernels give their output: the input's (`suggest_memory_format`)."""
    if x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last):
        return torch.contiguous_format
    return torch.channels_last


@torch.library.custom_op("pvtlab::resize_bilinear", mutates_args=())
def _resize(x: Tensor, size: list[int]) -> Tensor:
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


@_resize.register_fake
def _resize_shape(x: Tensor, size: list[int]) -> Tensor:
    return x.new_empty((*x.shape[:-2], *size)).contiguous(memory_format=_memory_format(x))


@torch.library.custom_op("pvtlab::resize_bilinear_backward", mutates_args=())
def _resize_backward(grad: Tensor, input_size: list[int]) -> Tensor:
    return torch.ops.aten.upsample_bilinear2d_backward(
        grad, list(grad.shape[-2:]), input_size, align_corners=False
    )


@_resize_backward.register_fake
def _resize_backward_shape(grad: Tensor, input_size: list[int]) -> Tensor:
    return grad.new_empty(input_size).contiguous(memory_format=_memory_format(grad))


def _save_input_size(
    ctx: torch.autograd.function.FunctionCtx, inputs: tuple, output: Tensor
) -> None:
    ctx.input_size = list(inputs[0].shape)


def _resize_gradient(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
    return _resize_backward(grad, ctx.input_size), None


_resize.register_autograd(_resize_gradient, setup_context=_save_input_size)
