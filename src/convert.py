"""Convert PVT weights between layouts and print what became of every tensor.

    python src/convert.py in=<file | folder> out=<file | folder> to=pvtlab|hf|timm
                          [img_size=<pixels>] [num_heads=1,2,5,8]

Layouts (pvtlab.models.layouts): `pvtlab`, one .pth or .safetensors file with the release's names
(what backbone.pretrained= reads; `in=` may also be a pvtlab classification .ckpt); `hf`,
transformers' save_pretrained folder (PvtForImageClassification / PvtModel); `timm`, timm's
save_for_hf folder. Printed: the tensors renamed, merged or split, the position embeddings
resized (with their grids) and what was dropped, with the reason.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pvtlab.models.checkpoint import CheckpointError
from pvtlab.models.layouts import LAYOUTS, convert

SETTINGS = {
    "in": "the weights to read: a file, or a transformers / timm folder",
    "out": "where to write: a .safetensors / .pth file (to=pvtlab) or a folder (to=hf, to=timm)",
    "to": f"the layout to write: {' | '.join(LAYOUTS)}",
    "img_size": "store the position embeddings for this input size (default: the source's)",
    "num_heads": "heads per stage when the source does not record them (default 1,2,5,8)",
}
REQUIRED = ("in", "out", "to")


def parse_settings(parser: argparse.ArgumentParser, items: Sequence[str]) -> dict[str, str]:
    """`key=value` items as a mapping; unknown or missing keys end the program with a message."""
    settings: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in SETTINGS:
            parser.error(f"{item!r}: expected key=value with key one of {', '.join(SETTINGS)}")
        settings[key] = value
    missing = [k for k in REQUIRED if not settings.get(k)]
    if missing:
        parser.error(f"missing {', '.join(f'{k}=' for k in missing)}")
    return settings


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python src/convert.py",
        description=__doc__.split("\n")[0],
        epilog="settings:\n" + "\n".join(f"  {k:<10} {v}" for k, v in SETTINGS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("settings", nargs="*", metavar="key=value")
    settings = parse_settings(parser, parser.parse_args(argv).settings)
    try:
        img_size = int(settings["img_size"]) if settings.get("img_size") else None
        num_heads = (
            tuple(int(h) for h in settings["num_heads"].split(","))
            if settings.get("num_heads")
            else None
        )
    except ValueError:
        parser.error("img_size takes one integer, num_heads integers separated by commas")
    try:
        result = convert(
            settings["in"], settings["out"], settings["to"], img_size=img_size, num_heads=num_heads
        )
    except (OSError, CheckpointError, ValueError) as error:
        parser.exit(1, f"error: {error}\n")
    print("\n".join(result.lines()))


if __name__ == "__main__":
    main(sys.argv[1:])
