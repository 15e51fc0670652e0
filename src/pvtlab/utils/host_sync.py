"""Operator calls that make the host wait for an accelerator, counted as they are dispatched.

Reading a tensor's value (``.item()``, ``bool(t)``, ``.tolist()``, ...) makes the host wait
until a GPU has computed it, and so does every operator whose output size depends on the values
(``nonzero``, boolean-mask indexing, ``unique``, ...): the host must learn the size before it can
queue the next kernel. Counting them at the dispatcher works on any device, a CPU-only machine
included, which is how the tests (tests/tasks/test_host_sync.py) keep the training steps free of
them and how the benchmark reports them (`pvtlab.bench.losses`). Copies to the host of a tensor
that already lives there (``.cpu()`` of a CPU tensor) dispatch nothing and are not seen.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["BOOLEAN_INDEXED", "VALUE_READS", "VALUE_SIZED", "DeviceWaits"]

# Operators whose result the host must wait for: a value, or a size that depends on the values.
VALUE_READS = frozenset(
    {"aten._local_scalar_dense", "aten.equal", "aten.is_nonzero", "aten.allclose"}
)
VALUE_SIZED = frozenset(
    {
        "aten.nonzero",
        "aten.masked_select",
        "aten._unique2",
        "aten.unique_dim",
        "aten.unique_consecutive",
        "aten.repeat_interleave",  # without output_size, its length is the sum of the repeats
    }
)
# Indexing operators that wait only when an index is a boolean mask.
BOOLEAN_INDEXED = frozenset(
    {"aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"}
)


class DeviceWaits(TorchDispatchMode):
    """Within this block, `calls` counts every operator call that would make the host wait for
    a GPU, by operator name (boolean-mask indexing as "<name> with a boolean mask")."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """How many waits were counted, all operators together."""
        return sum(self.calls.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        if name in VALUE_READS or name in VALUE_SIZED:
            self.calls[name] += 1
        elif name in BOOLEAN_INDEXED and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None
        ):
            self.calls[f"{name} with a boolean mask"] += 1
        return func(*args, **(kwargs or {}))
