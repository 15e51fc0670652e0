"""Which part of a profiled training step lies in the modules that `torch.compile` takes.

`compile=true` compiles a network's static-shape parts (`pvtlab.models.heads.static_shape_parts`)
and leaves the rest eager: a detector's target assignment, NMS and losses, the optimizer, the
loop. What compile could ever save is therefore at most the time of the operations run inside
those parts, forward and backward, other than the library kernels it calls as they are.
`marked_parts` names each forward of the parts in the profiler's record of an eager step;
`events_in_parts` finds, in that record, the operations of those forwards and the autograd
backward of them. In a compiled step the parts are already named, by dynamo's own ranges
(`Torch-Compiled Region: ...`, with its guard checks), so the same count says what the
compiled parts still take.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

__all__ = ["PART_RANGE", "events_in_parts", "marked_parts"]

PART_RANGE = "pvtlab::compiled_part"
# What dynamo names in the profiler: a compiled frame's run, and the guard checks before it.
_COMPILED_RANGES = ("Torch-Compiled Region", "TorchDynamo Cache Lookup")
_BACKWARD = "autograd::engine::evaluate_function"


@contextmanager
def marked_parts(parts: Sequence[nn.Module]) -> Iterator[None]:
    """Record each forward of `parts` as a profiler range named `PART_RANGE` while inside.

    Use it on eager modules only: hooks added to a compiled module make dynamo recompile."""
    open_ranges: list[Any] = []

    def enter(module: nn.Module, args: Any) -> None:
        open_ranges.append(torch.profiler.record_function(PART_RANGE).__enter__())

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        open_ranges.pop().__exit__(None, None, None)

    with ExitStack() as hooks:
        for part in parts:
            hooks.callback(part.register_forward_pre_hook(enter).remove)
            hooks.callback(part.register_forward_hook(leave).remove)
        yield


def events_in_parts(events: Iterable[Any]) -> list[Any]:
    """The profiler events (`torch.profiler.profile().events()`) of the work the parts did: each
    `PART_RANGE` or compiled region and everything under it, and the backward of every operation
    recorded there (the autograd engine's nodes that carry its sequence number, with theirs).
    Gradient accumulation into the parameters is left out: it runs in a compiled step too."""
    events = list(events)
    inside: dict[int, Any] = {}

    def take(event: Any) -> None:
        if id(event) not in inside:
            inside[id(event)] = event
            for child in event.cpu_children:
                take(child)

    for event in events:
        if event.name == PART_RANGE or event.name.startswith(_COMPILED_RANGES):
            take(event)
    forward_ops = {e.sequence_nr for e in inside.values() if e.sequence_nr >= 0}
    for event in events:
        if event.name.startswith(_BACKWARD) and event.sequence_nr in forward_ops:
            take(event)
    return list(inside.values())
