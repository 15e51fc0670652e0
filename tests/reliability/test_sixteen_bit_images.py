"""16-bit images are scaled to 8 bits (their high byte), not clipped to 255."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pvtlab.data.images import read_rgb

# Spread over the 16-bit range: Pillow's plain convert("RGB") clips all but the first to 255.
VALUES = np.array([[0, 255, 256, 4096, 32768, 51400, 65280, 65535]], dtype=np.uint16)
EXPECTED = (VALUES >> 8).astype(np.uint8)  # 0, 0, 1, 16, 128, 200, 255, 255


def _png_bytes(values: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG written byte by byte (big-endian samples), as cameras and scanners do."""
    height, width = values.shape[:2]
    rows = b"".join(b"\0" + values[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def test_16_bit_grayscale_png_is_scaled(tmp_path: Path) -> None:
    path = tmp_path / "gray16.png"
    path.write_bytes(_png_bytes(VALUES, colour_type=0))
    with Image.open(path) as opened:
        assert opened.mode.startswith("I")  # the case: a wide integer mode
    decoded = np.asarray(read_rgb(path))
    assert decoded.shape == (1, 8, 3)
    for channel in range(3):
        np.testing.assert_array_equal(decoded[..., channel], EXPECTED)


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_modes_are_scaled(tmp_path: Path, mode: str) -> None:
    if mode == "I":
        image = Image.fromarray(VALUES.astype(np.int32))
    else:
        dtype = "<u2" if mode == "I;16" else ">u2"
        image = Image.frombytes(mode, VALUES.shape[::-1], VALUES.astype(dtype).tobytes())
    path = tmp_path / "wide.tif"
    image.save(path)
    np.testing.assert_array_equal(np.asarray(read_rgb(path))[..., 0], EXPECTED)


def test_16_bit_rgb_png_is_scaled(tmp_path: Path) -> None:
    rgb = np.stack([VALUES, VALUES[:, ::-1], np.full_like(VALUES, 1000)], axis=-1)
    path = tmp_path / "rgb16.png"
    path.write_bytes(_png_bytes(rgb, colour_type=2))
    np.testing.assert_array_equal(np.asarray(read_rgb(path)), (rgb >> 8).astype(np.uint8))
