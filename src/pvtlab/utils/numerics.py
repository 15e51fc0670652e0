"""Numeric settings shared by every entry point (training, evaluation, benchmarks)."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FLOAT32_MATMUL_PRECISION", "scales_the_loss", "use_fast_float32_matmuls"]

# torch's "high": float32 matrix products and convolutions may run in TF32 on Ampere and newer
# GPUs (10-bit mantissa inputs, float32 accumulation), as timm and Lightning recommend for
# training; CPU products are unchanged.
FLOAT32_MATMUL_PRECISION = "high"


def use_fast_float32_matmuls() -> None:
    """Set the float32 matrix-product precision that `src/train.py` and `src/eval.py` run with,
    so benchmarks time the same kernels."""
    torch.set_float32_matmul_precision(FLOAT32_MATMUL_PRECISION)


def scales_the_loss(trainer: Any) -> bool:
    """Whether a Lightning trainer's precision scales the loss (fp16's gradient scaler): its
    gradients are unscaled only in the optimizer step, which the scaler skips on its own
    `found_inf`."""
    return getattr(trainer.precision_plugin, "scaler", None) is not None
