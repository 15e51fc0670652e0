"""Export a trained network to files that run without pvtlab: ONNX, TorchScript, torch.export.

    python src/export.py ckpt_path=<.ckpt> format=onnx|torchscript|exported_program [output=...]

The network is rebuilt from the checkpoint alone. What the exported graph takes and returns is
in `pvtlab.export.graphs`, the formats in `pvtlab.export.formats`. Every file is checked as it
is written: run again (onnxruntime, ``torch.jit.load``, ``torch.export.load``) on two input
sizes and batch sizes against PyTorch, the largest difference of each output reported, and a
`ValidationError` raised beyond the tolerance (`pvtlab.export.validation`).

``python -m pvtlab.export <ckpt>`` writes a classification checkpoint's backbone weights
instead, for ``backbone.pretrained=`` (`pvtlab.export.backbone`).
"""

from pvtlab.export.backbone import main
from pvtlab.export.exporter import (
    ExportResult,
    default_output,
    export_checkpoint,
    export_network,
    load_network,
)
from pvtlab.export.formats import FORMATS
from pvtlab.export.graphs import SIZE_DIVISOR, ExportError, export_graph
from pvtlab.export.validation import Comparison, ValidationError

__all__ = [
    "FORMATS",
    "SIZE_DIVISOR",
    "Comparison",
    "ExportError",
    "ExportResult",
    "ValidationError",
    "default_output",
    "export_checkpoint",
    "export_graph",
    "export_network",
    "load_network",
    "main",
]
