"""A pvtlab checkpoint to a validated ONNX, TorchScript or torch.export file."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pvtlab.config import ConfigError
from pvtlab.export.formats import FORMATS, INPUT_NAME
from pvtlab.export.graphs import SIZE_DIVISOR, export_graph
from pvtlab.export.metadata import export_metadata
from pvtlab.export.validation import Comparison, validate
from pvtlab.pipeline import build_model, checkpoint_description, read_training_checkpoint

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    output_names: tuple[str, ...]
    comparisons: list[Comparison]


def load_network(ckpt_path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The network of a pvtlab checkpoint, rebuilt from its saved description and loaded
    strictly, in eval mode; returned with the description."""
    checkpoint = read_training_checkpoint(ckpt_path)
    description = checkpoint.get("hyper_parameters", {}).get("model_config")
    if description is None:
        raise ConfigError(
            f"{ckpt_path} carries no model description (hyper_parameters.model_config): only "
            "checkpoints of pvtlab runs can be exported"
        )
    rebuilt = checkpoint_description(description)
    network = build_model(rebuilt["backbone"], rebuilt["head"], rebuilt["num_classes"])
    state = {
        key.removeprefix("model."): value
        for key, value in checkpoint["state_dict"].items()
        if key.startswith("model.")
    }
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ConfigError(
            f"{ckpt_path}: the weights do not fit its own description: {error}"
        ) from None
    return network.eval(), dict(description)


def validation_inputs(
    image_size: Sequence[int], seed: int = 0
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The example the graph is captured with and the two inputs it is checked on.

    The three differ in batch size and in height and width, and the example is not square, so
    that a graph that stored a size (or a square grid) fails the check instead of passing it.
    """
    height, width = (int(s) for s in image_size)
    if height % SIZE_DIVISOR or width % SIZE_DIVISOR or height <= 0 or width <= 0:
        raise ConfigError(
            f"image_size={[height, width]}: exported graphs take sides that are multiples of "
            f"{SIZE_DIVISOR}"
        )
    generator = torch.Generator().manual_seed(seed)
    example = torch.randn(
        2, 3, height + 2 * SIZE_DIVISOR, width + SIZE_DIVISOR, generator=generator
    )
    checks = [
        torch.randn(1, 3, height, width, generator=generator),
        torch.randn(3, 3, height + SIZE_DIVISOR, width + 2 * SIZE_DIVISOR, generator=generator),
    ]
    return example, checks


def default_output(ckpt_path: str | Path, format: str) -> Path:
    """Beside the checkpoint, with the format's suffix: checkpoints/last.ckpt -> checkpoints/last.onnx."""
    ckpt_path = Path(ckpt_path)
    return ckpt_path.parent / f"{ckpt_path.stem}{FORMATS[format].suffix}"


def export_network(
    network: nn.Module,
    description: Mapping[str, Any],
    format: str,
    output: str | Path,
    image_size: Sequence[int] = (224, 224),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """Write `network`'s graph (`pvtlab.export.graphs`) in `format` with the description's
    metadata (`pvtlab.export.metadata`), then run the written file on two input sizes against
    PyTorch; raises ValidationError beyond the tolerance (the file stays, for inspection)."""
    if format not in FORMATS:
        raise ConfigError(f"format={format}: choose one of {', '.join(FORMATS)}")
    spec = FORMATS[format]
    graph = export_graph(network, description)
    example, checks = validation_inputs(image_size)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    metadata = export_metadata(description, graph.output_names, INPUT_NAME)
    spec.write(graph, example, output, graph.output_names, metadata)
    log.info("wrote %s; validating it against PyTorch", output)
    comparisons = validate(spec.load(output), graph, checks, graph.output_names, atol, rtol)
    return ExportResult(output, tuple(graph.output_names), comparisons)


def export_checkpoint(
    ckpt_path: str | Path,
    format: str = "onnx",
    output: str | Path | None = None,
    image_size: Sequence[int] = (224, 224),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> ExportResult:
    """`export_network` of a pvtlab checkpoint's network (default output: `default_output`)."""
    if format not in FORMATS:  # before the checkpoint is read
        raise ConfigError(f"format={format}: choose one of {', '.join(FORMATS)}")
    network, description = load_network(ckpt_path)
    output = Path(output) if output else default_output(ckpt_path, format)
    return export_network(network, description, format, output, image_size, atol, rtol)
