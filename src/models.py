"""List pvtlab's backbones and heads: parameters, GMACs, the choice that selects each, its weights.

    python src/models.py                       # print the table (also `make models`)
    python src/models.py --markdown            # write it to docs/models.md
    python src/models.py --backbone pvt_tiny --head retinanet   # only these
    python src/models.py --data shapes --head-backbone pvt_tiny   # at the quickstart's sizes

How each is measured: pvtlab.catalog.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from pvtlab.catalog import HEAD_BACKBONE, list_models, markdown_table, text_table

REPO = Path(__file__).resolve().parents[1]
MARKDOWN = REPO / "docs" / "models.md"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python src/models.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--markdown",
        nargs="?",
        const=MARKDOWN,
        type=Path,
        metavar="PATH",
        help=f"write the table as Markdown (default {MARKDOWN.relative_to(REPO)})",
    )
    parser.add_argument("--backbone", action="append", help="list only this backbone (repeatable)")
    parser.add_argument("--head", action="append", help="list only this head (repeatable)")
    parser.add_argument(
        "--data",
        help="count every model on this data choice (e.g. shapes) instead of the paper's",
    )
    parser.add_argument(
        "--head-backbone", default=HEAD_BACKBONE, help=f"backbone of the heads ({HEAD_BACKBONE})"
    )
    args = parser.parse_args(argv)
    only = args.backbone is not None or args.head is not None
    entries = list_models(
        REPO / "conf",
        backbones=args.backbone or ([] if only else None),
        heads=args.head or ([] if only else None),
        data=args.data,
        head_backbone=args.head_backbone,
    )
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_table(entries))
        print(f"wrote {args.markdown}")
    else:
        print(text_table(entries))


if __name__ == "__main__":
    main(sys.argv[1:])
