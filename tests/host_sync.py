"""Test helpers: reads of tensor values and operator calls that make the host wait for a GPU.

Reading a tensor's value (``.item()``, ``bool(t)``, ``.tolist()``, ...) makes the host wait
until a GPU has computed it, and so does every operator whose output size depends on the values
(``nonzero``, boolean-mask indexing, ``unique``, ...): the host must learn the size before it can
queue the next kernel. Counting them at the dispatcher (`DeviceWaits`) and intercepting the
reads (`intercept_host_reads`) works on any device, a CPU-only machine included, which is how
tests/tasks/test_host_sync.py keeps the training steps free of them. Copies to the host of a
tensor that already lives there (``.cpu()`` of a CPU tensor) dispatch nothing and are not seen.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "BOOLEAN_INDEXED",
    "HOST_READS",
    "VALUE_READS",
    "VALUE_SIZED",
    "DeviceWaits",
    "forbid_host_reads",
    "intercept_host_reads",
]

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


# Tensor methods that read a value back to the host.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__")


@contextmanager
def intercept_host_reads(
    monkeypatch: pytest.MonkeyPatch, on_read: Callable[[str], None]
) -> Iterator[None]:
    """Call `on_read(name)` before every `Tensor.<name>` of `HOST_READS` in this block."""

    def intercepted(name: str) -> Any:
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            on_read(name)
            return original(self, *args, **kwargs)

        return read

    with monkeypatch.context() as patch:
        for name in HOST_READS:
            patch.setattr(torch.Tensor, name, intercepted(name))
        yield


@contextmanager
def forbid_host_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fail on any read of a value, or any operator call that would wait for the device."""

    def refuse(name: str) -> None:
        raise AssertionError(f"Tensor.{name} read a value back to the host in a training step")

    with intercept_host_reads(monkeypatch, refuse), DeviceWaits() as waits:
        yield
    assert not waits.calls, f"the step would make the host wait for the device: {waits.calls}"
