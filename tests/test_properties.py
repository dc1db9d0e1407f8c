"""Property-based tests of the one decode-and-preprocess path, load_image(decode_payload(x)):
whatever the bytes, it returns an (size, size, 3) uint8 array or raises ImageError, nothing else.

The default profile is deterministic and quick (a few hundred examples per property, well under a
minute); `HYPOTHESIS_PROFILE=deep` runs thousands of random ones (a few minutes) when the
preprocessing changes.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import warnings
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pyfunc.preprocess import MAX_PIXELS, ImageError, decode_payload, load_image

settings.register_profile(
    "default",
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep", max_examples=3000, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

FORMATS = ["JPEG", "PNG", "GIF", "BMP", "WEBP"]
# Every mode Pillow can make from RGB; formats that cannot store one get plain RGB instead.
MODES = ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "F"]
sizes = st.integers(1, 64)


def preprocess(value, size: int):
    """The served path for one cell: payload -> bytes -> array. Returns the array or None for ImageError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about corrupt EXIF and big images; we judge the result
        try:
            array = load_image(decode_payload(value), size)
        except ImageError:
            return None
    assert isinstance(array, np.ndarray), type(array)
    assert array.shape == (size, size, 3) and array.dtype == np.uint8, (array.shape, array.dtype)
    return array


@st.composite
def valid_images(draw) -> bytes:
    """A real image file of a random size, mode and format, sometimes with an EXIF orientation tag."""
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    mode, fmt = draw(st.sampled_from(MODES)), draw(st.sampled_from(FORMATS))
    pixels = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).integers(0, 256, (height, width, 3), np.uint8)
    rgb = Image.fromarray(pixels)
    options = {}
    if fmt in ("JPEG", "PNG", "WEBP") and draw(st.booleans()):
        exif = Image.Exif()
        exif[0x0112] = draw(st.integers(0, 9))  # 1..8 are orientations; 0 and 9 are nonsense
        options["exif"] = exif.tobytes()
    if fmt == "GIF" and draw(st.booleans()):
        options.update(save_all=True, append_images=[rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT)], duration=20)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow deprecates writing some modes as PNG
        try:
            rgb.convert(mode).save(buffer, fmt, **options)
        except (OSError, ValueError, KeyError):  # the format cannot store this mode
            buffer = io.BytesIO()
            rgb.save(buffer, fmt, **options)
    return buffer.getvalue()


@given(st.one_of(st.binary(max_size=4096), st.text(max_size=1024)), sizes)
def test_arbitrary_bytes_and_text(value, size):
    preprocess(value, size)


@given(valid_images(), sizes)
def test_every_valid_image_is_answered(data, size):
    assert preprocess(data, size) is not None
    # base64 text (with or without a data: URL prefix) decodes to the very same array as raw bytes
    text = base64.b64encode(data).decode("ascii")
    np.testing.assert_array_equal(preprocess(text, size), preprocess(data, size))
    np.testing.assert_array_equal(preprocess("data:image/x;base64," + text, size), preprocess(data, size))


@given(
    valid_images(),
    st.lists(st.tuples(st.integers(0, 2**20), st.integers(0, 255)), min_size=1, max_size=12),
    st.sampled_from(["flip", "truncate", "insert", "delete"]),
    sizes,
)
def test_mutated_images(data, edits, how, size):
    damaged = bytearray(data)
    for position, value in edits:
        index = position % len(damaged)
        if how == "flip":
            damaged[index] = value
        elif how == "truncate":
            del damaged[max(1, index) :]
        elif how == "insert":
            damaged.insert(index, value)
        elif len(damaged) > 1:
            del damaged[index]
    preprocess(bytes(damaged), size)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@given(
    st.integers(1, 2**31 - 1),
    st.integers(1, 2**31 - 1),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.sampled_from([0, 2, 3, 4, 6]),
    st.integers(0, 1),
    st.binary(max_size=512),
    sizes,
)
def test_well_formed_png_headers_of_any_size(width, height, depth, colour, interlace, body, size):
    """Valid chunks (right CRCs) with any dimensions, bit depth and colour type: past the pixel limit
    it is refused from the header ("too large", or "not an image" for a combination PNG does not
    allow), never decoded; below it, an array or an ImageError."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, interlace)
    palette = png_chunk(b"PLTE", bytes(range(48))) if colour == 3 else b""
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + palette + png_chunk(b"IDAT", zlib.compress(body)) + png_chunk(b"IEND", b"")
    if width * height > MAX_PIXELS:
        with pytest.raises(ImageError, match="too large|not an image"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow's own warning past 89 MP; we refuse earlier anyway
            load_image(data, size)
    else:
        preprocess(data, size)


@given(st.binary(max_size=256), sizes)
def test_any_exif_block(junk, size):
    """A JPEG whose EXIF block is random: the orientation step must not crash on it."""
    buffer = io.BytesIO()
    Image.new("RGB", (12, 7), (10, 200, 30)).save(buffer, "JPEG", exif=b"Exif\x00\x00" + junk)
    preprocess(buffer.getvalue(), size)


@given(st.binary(max_size=2048))
def test_base64_round_trip(data):
    assert decode_payload(base64.b64encode(data).decode("ascii")) == data
    assert decode_payload(data) == data
