"""A classification checkpoint's backbone weights, for `backbone.pretrained=`.

    python -m pvtlab.export outputs/classification/runs/<run>/checkpoints/last.ckpt [OUT] [--ema]

The output is a plain state dict of the timm classification model, the layout of the released
pvt_*.pth files, which detection and segmentation load with ``backbone.pretrained=OUT``. (A
classification run writes it by itself, as ``<run>/backbone.pth``, unless
``task.export_backbone=false``.) To export a whole network for deployment, use
``python src/export.py`` (`pvtlab.export.export_checkpoint`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pvtlab.tasks.classification import export_backbone


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pvtlab.export", description=__doc__.split("\n")[0]
    )
    parser.add_argument("checkpoint", help="a pvtlab classification .ckpt (best or last)")
    parser.add_argument(
        "output",
        nargs="?",
        default=None,
        help="where to write the weights (default: <run>/backbone.pth beside checkpoints/)",
    )
    parser.add_argument(
        "--ema", action="store_true", help="export the EMA weights (runs with task.ema.enabled)"
    )
    args = parser.parse_args(argv)
    try:
        path = export_backbone(args.checkpoint, args.output, ema=args.ema)
    except (OSError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print(f"Backbone weights: {path}\nUse them with backbone.pretrained={path}")
