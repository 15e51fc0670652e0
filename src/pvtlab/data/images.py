"""Decoding an image file into the RGB picture the transforms take.

Pillow decodes every format the loaders accept; `to_rgb` then gives one picture kind: the EXIF
orientation applied (a photo as a viewer shows it, the frame COCO annotations are drawn in, see
`pvtlab.data.coco`), and grayscale, palette, RGBA (alpha dropped) and CMYK images converted to
8-bit RGB, as every loader's `convert("RGB")` does.

Integer images of more than 8 bits (16-bit grayscale PNG / TIFF, Pillow's modes ``I;16*`` and
``I``) keep their high byte (``value >> 8``), where Pillow's own conversion would clip every value
above 255 to white. The high byte is what Pillow keeps of a 16-bit RGB PNG and what
torchvision's ``convert_image_dtype`` gives for uint16 -> uint8, so every 16-bit image is scaled
alike and an 8-bit image stored in 16 bits (``v * 257``) decodes to its original values.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "DECODE_ERRORS",
    "EXIF_ORIENTATION",
    "IMAGE_EXTENSIONS",
    "WIDE_INTEGER_MODES",
    "orientation_transpose",
    "read_rgb",
    "to_rgb",
]

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
# Pillow's single-channel integer modes wider than 8 bits (16-bit, and the 32-bit mode Pillow
# gives some 16-bit files).
WIDE_INTEGER_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _high_byte(image: Image.Image) -> Image.Image:
    """An 8-bit grayscale picture of a 16-bit one: each value's high byte (values of a 32-bit
    image are taken as 16-bit, clipped to 0..65535)."""
    values = np.clip(np.asarray(image, dtype=np.int64), 0, 65535) >> 8
    return Image.fromarray(values.astype(np.uint8))


# The transpose that shows an image as its EXIF orientation (2..8) says, as
# `PIL.ImageOps.exif_transpose` applies it.
_ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def orientation_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transpose `to_rgb` applies to `image` for its EXIF orientation (None: none), for
    turning a companion picture (a label map) the same way."""
    return _ORIENTATION_TRANSPOSES.get(image.getexif().get(EXIF_ORIENTATION, 1))


def to_rgb(image: Image.Image, orient: bool = True) -> Image.Image:
    """`image` as an 8-bit RGB picture, turned by its EXIF orientation when `orient`."""
    if orient and image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        image = ImageOps.exif_transpose(image)
    if image.mode in WIDE_INTEGER_MODES:
        image = _high_byte(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def read_rgb(path: str | os.PathLike[str], orient: bool = True) -> Image.Image:
    """Decode the file at `path` with `to_rgb`; raises one of `DECODE_ERRORS` if it cannot."""
    with Image.open(Path(path)) as image:
        image.load()
        rgb = to_rgb(image, orient)
        # A new picture either way: nothing refers to the file once it is closed.
        return rgb.copy() if rgb is image else rgb
