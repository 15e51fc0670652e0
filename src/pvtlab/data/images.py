"""Decoding an image file into the RGB picture the transforms take.

Pillow decodes every format the loaders accept; `to_rgb` then gives one picture kind: the EXIF
orientation applied (a photo as a viewer shows it, the frame COCO annotations are drawn in, see
`pvtlab.data.coco`), and grayscale, palette, RGBA (alpha dropped) and CMYK images converted to
8-bit RGB, as every loader's `convert("RGB")` does.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = ["DECODE_ERRORS", "EXIF_ORIENTATION", "IMAGE_EXTENSIONS", "read_rgb", "to_rgb"]

EXIF_ORIENTATION = 0x0112
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# What Pillow raises for a file that is not a decodable image (truncated, foreign, too large).
DECODE_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    Image.DecompressionBombError,
)


def to_rgb(image: Image.Image, orient: bool = True) -> Image.Image:
    """`image` as an 8-bit RGB picture, turned by its EXIF orientation when `orient`."""
    if orient and image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | os.PathLike[str], orient: bool = True) -> Image.Image:
    """Decode the file at `path` with `to_rgb`; raises one of `DECODE_ERRORS` if it cannot."""
    with Image.open(Path(path)) as image:
        image.load()
        rgb = to_rgb(image, orient)
        # A new picture either way: nothing refers to the file once it is closed.
        return rgb.copy() if rgb is image else rgb
