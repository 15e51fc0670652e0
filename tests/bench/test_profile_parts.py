"""Attributing a profiled step's operations to the parts that `compile=true` compiles."""

from __future__ import annotations

import torch
from torch import nn

from pvtlab.bench.profile_parts import PART_RANGE, events_in_parts, marked_parts

BACKWARD = "autograd::engine::evaluate_function: "


def test_a_parts_forward_and_its_backward_are_inside_the_loss_and_accumulation_outside() -> None:
    part = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    with marked_parts([part]), torch.profiler.profile() as profiled:
        part(torch.randn(5, 8)).pow(2).mean().backward()
    events = profiled.events()
    inside = {event.name for event in events_in_parts(events)}
    outside = {event.name for event in events} - inside
    assert {PART_RANGE, "aten::addmm", "aten::gelu"} <= inside  # the forward
    assert {
        BACKWARD + "GeluBackward0",
        BACKWARD + "AddmmBackward0",
        "aten::gelu_backward",
    } <= inside
    assert {"aten::pow", "aten::mean", BACKWARD + "PowBackward0"} <= outside  # the loss
    assert BACKWARD + "torch::autograd::AccumulateGrad" in outside
    # the hooks are gone afterwards
    assert not part._forward_pre_hooks and not part._forward_hooks


def test_nothing_is_inside_without_marked_parts() -> None:
    part = nn.Linear(4, 4)
    with torch.profiler.profile() as profiled:
        part(torch.randn(2, 4)).sum().backward()
    assert events_in_parts(profiled.events()) == []


def test_a_compiled_part_is_found_by_dynamos_regions() -> None:
    part = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    part.compile()
    inputs = torch.randn(5, 8)
    part(inputs).pow(2).mean().backward()  # compiles
    with torch.profiler.profile() as profiled:
        part(inputs).pow(2).mean().backward()
    events = profiled.events()
    inside = {event.name for event in events_in_parts(events)}
    outside = {event.name for event in events} - inside
    assert {"CompiledFunction", BACKWARD + "CompiledFunctionBackward", "aten::addmm"} <= inside
    assert any(name.startswith("Torch-Compiled Region") for name in inside)
    assert {"aten::pow", BACKWARD + "PowBackward0"} <= outside
