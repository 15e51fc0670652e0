"""Checking an exported file against the PyTorch network it came from.

An element passes when ``|exported - pytorch| <= atol + rtol * |pytorch|`` (numpy's
``allclose``); an export passes when every element of every output passes at every input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


class ValidationError(AssertionError):
    """An exported file whose outputs are not the PyTorch network's."""


@dataclass(frozen=True)
class Comparison:
    """One output at one input shape: the largest difference and whether it is within tolerance."""

    input_shape: tuple[int, ...]
    output: str
    max_abs_diff: float
    violations: int  # elements outside atol + rtol * |reference|
    numel: int

    @property
    def passed(self) -> bool:
        return self.violations == 0

    def __str__(self) -> str:
        shape = "x".join(str(s) for s in self.input_shape)
        verdict = "ok" if self.passed else f"FAILED ({self.violations} of {self.numel} elements)"
        return f"input {shape}  {self.output:<7} max |diff| {self.max_abs_diff:.3e}  {verdict}"


def compare(
    exported: Sequence[Tensor],
    reference: Sequence[Tensor],
    names: Sequence[str],
    input_shape: tuple[int, ...],
    atol: float,
    rtol: float,
) -> list[Comparison]:
    """Output by output; a missing output or another shape is a ValidationError at once."""
    if len(exported) != len(reference):
        raise ValidationError(
            f"input {input_shape}: the exported graph returns {len(exported)} outputs, "
            f"PyTorch {len(reference)} ({', '.join(names)})"
        )
    results = []
    for name, ours, theirs in zip(names, exported, reference, strict=True):
        if tuple(ours.shape) != tuple(theirs.shape):
            raise ValidationError(
                f"input {input_shape}: output {name} has shape {tuple(ours.shape)} in the export, "
                f"{tuple(theirs.shape)} in PyTorch"
            )
        ours, theirs = ours.detach().double(), theirs.detach().double()
        diff = (ours - theirs).abs()
        outside = diff > atol + rtol * theirs.abs()
        outside |= ours.isnan() != theirs.isnan()
        results.append(
            Comparison(
                input_shape,
                name,
                float(diff.nan_to_num(0.0).max()) if diff.numel() else 0.0,
                int(outside.sum()),
                diff.numel(),
            )
        )
    return results


def validate(
    run_exported: Callable[[Tensor], Sequence[Tensor]],
    run_pytorch: Callable[[Tensor], Sequence[Tensor]],
    inputs: Sequence[Tensor],
    names: Sequence[str],
    atol: float,
    rtol: float,
) -> list[Comparison]:
    """Run both on every input; return every comparison, or raise ValidationError listing them
    when any output is out of tolerance."""
    results: list[Comparison] = []
    for images in inputs:
        with torch.no_grad():
            reference = run_pytorch(images)
            exported = run_exported(images)
        results += compare(exported, reference, names, tuple(images.shape), atol, rtol)
    if not all(r.passed for r in results):
        lines = "\n  ".join(str(r) for r in results)
        raise ValidationError(
            f"the exported model differs from PyTorch beyond atol={atol:g}, rtol={rtol:g}:\n  {lines}"
        )
    return results
