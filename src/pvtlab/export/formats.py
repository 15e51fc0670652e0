"""The three file formats: how a graph is written, and how the written file is run again.

* ``onnx``: ``torch.export`` then ONNX (``torch.onnx.export``, which needs `onnx` and
  `onnxscript`); run with onnxruntime. Install with ``pip install -e '.[onnx]'``.
* ``torchscript``: ``torch.jit.trace``; run with ``torch.jit.load``.
* ``exported_program``: ``torch.export`` saved as ``.pt2``; run with
  ``torch.export.load(path).module()``.

Each file carries the checkpoint's description (`pvtlab.export.metadata`): ONNX as its
``metadata_props``, the two others as the extra file `METADATA_FILE` (a JSON object), read with
``torch.jit.load(path, _extra_files={METADATA_FILE: ""})`` or
``torch.export.load(path, extra_files={METADATA_FILE: ""})``.

The batch dimension is dynamic in all three, and so are height and width (multiples of
`SIZE_DIVISOR`): ``torch.export`` is told so, and tracing records the size arithmetic as graph
operations. The two validation sizes check it (`pvtlab.export.validation`).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.export import Dim, ExportedProgram

from pvtlab.export.graphs import SIZE_DIVISOR, ExportError

Runner = Callable[[Tensor], tuple[Tensor, ...]]
INPUT_NAME = "images"
METADATA_FILE = "pvtlab_metadata.json"
# Upper bounds of the dynamic dimensions (torch.export wants a range): 8192 pixels a side.
MAX_BATCH = 1024
MAX_SIDE_STEPS = 8192 // SIZE_DIVISOR


def export_program(graph: nn.Module, example: Tensor) -> ExportedProgram:
    """``torch.export`` with a dynamic batch and dynamic height and width."""
    batch = Dim("batch", min=1, max=MAX_BATCH)
    height = Dim("height_steps", min=1, max=MAX_SIDE_STEPS)
    width = Dim("width_steps", min=1, max=MAX_SIDE_STEPS)
    shapes = {INPUT_NAME: {0: batch, 2: SIZE_DIVISOR * height, 3: SIZE_DIVISOR * width}}
    with torch.no_grad():
        return torch.export.export(graph, (example,), dynamic_shapes=shapes)


def write_exported_program(
    graph: nn.Module,
    example: Tensor,
    path: Path,
    output_names: Sequence[str],
    metadata: Mapping[str, str],
) -> None:
    extra = {METADATA_FILE: json.dumps(dict(metadata))}
    torch.export.save(export_program(graph, example), path, extra_files=extra)


def load_exported_program(path: Path) -> Runner:
    module = torch.export.load(path).module()
    return lambda images: tuple(module(images))


def write_torchscript(
    graph: nn.Module,
    example: Tensor,
    path: Path,
    output_names: Sequence[str],
    metadata: Mapping[str, str],
) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        # TorchScript is deprecated upstream; it is what this format asks for.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        # Tracing fixes the branches on sizes (padding to a multiple of SIZE_DIVISOR, which the
        # graph's inputs never need); the two validation sizes check that the trace holds.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(graph, example, check_trace=False)
        torch.jit.save(traced, str(path), _extra_files={METADATA_FILE: json.dumps(dict(metadata))})


def load_torchscript(path: Path) -> Runner:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=Warning)
        module = torch.jit.load(str(path), map_location="cpu")
    return lambda images: tuple(module(images))


def write_onnx(
    graph: nn.Module,
    example: Tensor,
    path: Path,
    output_names: Sequence[str],
    metadata: Mapping[str, str],
) -> None:
    _require("onnx", "onnxscript")
    program = torch.onnx.export(
        export_program(graph, example),
        input_names=[INPUT_NAME],
        output_names=list(output_names),
        verbose=False,
    )
    program.model.metadata_props.update(metadata)
    # one self-contained file (ONNX's protobuf limit: 2 GB)
    program.save(str(path), external_data=False)


def load_onnx(path: Path) -> Runner:
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def run(images: Tensor) -> tuple[Tensor, ...]:
        outputs = session.run(None, {INPUT_NAME: images.detach().cpu().numpy()})
        return tuple(torch.from_numpy(output) for output in outputs)

    return run


def _require(*modules: str) -> None:
    import importlib.util

    missing = [name for name in modules if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(
            f"format=onnx needs {', '.join(missing)}: pip install -e '.[onnx]' (make install "
            "installs it)"
        )


@dataclass(frozen=True)
class Format:
    """One export format: its file suffix, its writer and the runner of a written file."""

    name: str
    suffix: str
    write: Callable[[nn.Module, Tensor, Path, Sequence[str], Mapping[str, str]], None]
    load: Callable[[Path], Runner]


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("onnx", ".onnx", write_onnx, load_onnx),
        Format("torchscript", ".torchscript.pt", write_torchscript, load_torchscript),
        Format("exported_program", ".pt2", write_exported_program, load_exported_program),
    )
}
