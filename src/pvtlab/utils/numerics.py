"""Numeric settings shared by every entry point (training, evaluation, benchmarks)."""

from __future__ import annotations

import torch

__all__ = ["FLOAT32_MATMUL_PRECISION", "use_fast_float32_matmuls"]

# torch's "high": float32 matrix products and convolutions may run in TF32 on Ampere and newer
# GPUs (10-bit mantissa inputs, float32 accumulation), as timm and Lightning recommend for
# training; CPU products are unchanged.
FLOAT32_MATMUL_PRECISION = "high"


def use_fast_float32_matmuls() -> None:
    """Set the float32 matrix-product precision that `src/train.py` and `src/eval.py` run with,
    so benchmarks time the same kernels."""
    torch.set_float32_matmul_precision(FLOAT32_MATMUL_PRECISION)
