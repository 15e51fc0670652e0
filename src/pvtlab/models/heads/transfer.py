"""Host-to-device copies that do not make the host wait for the device."""

from __future__ import annotations

import torch


def to_device_without_waiting(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values`, a host tensor, on `device`, copied without the host waiting for the device.

    A blocking copy to a GPU first waits for every kernel queued before it, which in a training
    step stalls the host until the forward has run. Pinned host memory makes the copy one more
    operation in the stream's queue; the pinned block is not reused before the copy is done
    (torch's caching host allocator records the stream). Elsewhere a plain copy."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
