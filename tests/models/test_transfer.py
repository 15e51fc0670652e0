"""Host-to-device copies without waiting (pvtlab.models.heads.transfer)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pvtlab.models.heads.transfer import to_device_without_waiting


def test_a_cpu_copy_is_a_plain_one(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("pinned memory needs CUDA")

    monkeypatch.setattr(torch.Tensor, "pin_memory", refuse)
    values = torch.arange(6).reshape(2, 3)
    copied = to_device_without_waiting(values, torch.device("cpu"))
    assert torch.equal(copied, values) and copied.device.type == "cpu"


def test_a_gpu_copy_is_pinned_and_not_waited_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Recorded without a GPU: the host tensor is pinned, then copied with non_blocking."""
    calls: list[tuple[str, Any]] = []

    def pin(self: torch.Tensor) -> torch.Tensor:
        calls.append(("pin_memory", None))
        return self

    def to(self: torch.Tensor, device: Any, non_blocking: bool = False) -> torch.Tensor:
        calls.append(("to", (str(device), non_blocking)))
        return self

    monkeypatch.setattr(torch.Tensor, "pin_memory", pin)
    monkeypatch.setattr(torch.Tensor, "to", to)
    to_device_without_waiting(torch.ones(3), torch.device("cuda", 0))
    assert calls == [("pin_memory", None), ("to", ("cuda:0", True))]
