"""`resize_bilinear`: F.interpolate's numbers and layout, and one opaque operator when compiled."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pvtlab.models.resize import Upsample2x, resize_bilinear

LAYOUTS = [torch.contiguous_format, torch.channels_last]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_resize_and_its_gradient_are_interpolates(layout: torch.memory_format) -> None:
    x = torch.randn(2, 3, 5, 7).contiguous(memory_format=layout).requires_grad_()
    expected = F.interpolate(x, size=(11, 4), mode="bilinear", align_corners=False)
    out = resize_bilinear(x, (11, 4))
    grad = torch.randn_like(expected)
    assert torch.equal(out, expected) and out.stride() == expected.stride()
    (got,) = torch.autograd.grad(out, x, grad)
    (want,) = torch.autograd.grad(expected, x, grad)
    assert torch.equal(got, want) and got.stride() == want.stride()


def test_upsample2x_is_nn_upsample() -> None:
    x = torch.randn(2, 4, 6, 5)
    upsample = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.equal(Upsample2x()(x), upsample(x))


def test_the_operator_passes_torch_library_checks() -> None:
    x = torch.randn(2, 3, 5, 7, requires_grad=True)
    torch.library.opcheck(torch.ops.pvtlab.resize_bilinear.default, (x, [9, 4]))
    grad = torch.randn(2, 3, 9, 4)
    torch.library.opcheck(torch.ops.pvtlab.resize_bilinear_backward.default, (grad, [2, 3, 5, 7]))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_the_resize_stays_atens_forward_and_backward(layout: torch.memory_format) -> None:
    """Inductor would otherwise differentiate its gathers into a scatter-add; here the compiled
    backward calls ATen's kernel, and the results (computed around it) are eager's."""

    def head(x: torch.Tensor) -> torch.Tensor:
        return (resize_bilinear(x.relu(), (12, 10)) * 2).sin()

    x = torch.randn(2, 3, 6, 5).contiguous(memory_format=layout).requires_grad_()
    grad = torch.randn(2, 3, 12, 10)
    compiled = torch.compile(head, fullgraph=True)
    with torch.profiler.profile() as profiled:
        out = compiled(x)
        (got,) = torch.autograd.grad(out, x, grad)
    names = {event.name for event in profiled.events()}
    assert {"pvtlab::resize_bilinear", "aten::upsample_bilinear2d_backward"} <= names
    expected = head(x)
    (want,) = torch.autograd.grad(expected, x, grad)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(got, want)
