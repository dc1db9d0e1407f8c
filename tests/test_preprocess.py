"""The one preprocessing function: every format and mode the contract names, and clear errors."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from pyfunc.preprocess import ImageError, decode_payload, load_image


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


RED = Image.new("RGB", (80, 60), (220, 20, 20))
NOISE = Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8))


@pytest.mark.parametrize(
    "data",
    [
        encode(RED, "JPEG"),
        encode(RED, "PNG"),
        encode(RED, "WEBP", lossless=True),
        encode(RED, "BMP"),
        encode(RED, "GIF"),
        encode(RED.convert("CMYK"), "JPEG"),
        encode(RED.convert("P"), "PNG"),
        encode(RED.convert("RGBA"), "PNG"),
    ],
    ids=["jpeg", "png", "webp", "bmp", "gif", "cmyk-jpeg", "palette", "rgba"],
)
def test_every_format_becomes_the_same_rgb_array(data):
    array = load_image(data, 32)
    assert array.shape == (32, 32, 3) and array.dtype == np.uint8
    assert np.abs(array.astype(int) - (220, 20, 20)).max() <= 12


def test_sixteen_bit_grey_is_scaled_not_clipped():
    grey = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))
    assert abs(int(load_image(encode(grey, "PNG"), 8)[4, 4, 0]) - 128) <= 1


def test_transparency_is_shown_on_white():
    clear = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert (load_image(encode(clear, "PNG"), 8) == 255).all()
    palette = Image.new("P", (10, 10), 0)
    assert (load_image(encode(palette, "PNG", transparency=0), 8) == 255).all()
    grey_alpha = Image.new("LA", (10, 10), (0, 0))
    assert (load_image(encode(grey_alpha, "PNG"), 8) == 255).all()


def test_animated_gif_uses_the_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((0, 200, 0), (0, 0, 200))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    pixel = load_image(data, 8)[4, 4]
    assert pixel[1] > 150 and pixel[2] < 60


def test_exif_orientation_is_applied():
    left_red = Image.new("RGB", (40, 20), (0, 0, 255))
    left_red.paste((255, 0, 0), (0, 0, 20, 20))  # red on the left half
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    rotated = load_image(encode(left_red, "JPEG", exif=exif.tobytes()), 20)
    # Displayed upright, the red half is on top, so the centre-square crop is mostly red on top.
    assert rotated[2, 10, 0] > 150 and rotated[2, 10, 2] < 100


def test_aspect_ratio_is_kept_by_centre_crop():
    wide = Image.new("RGB", (300, 100), (0, 0, 255))
    wide.paste((255, 0, 0), (100, 0, 200, 100))  # the centre square is red
    array = load_image(encode(wide, "PNG"), 16)
    assert (array[..., 0] > 200).all()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims huge dimensions: decoding it would need gigabytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [7000, 60000])  # past our limit; past Pillow's own limit too
def test_decompression_bomb_is_refused_before_decoding(side):
    with pytest.raises(ImageError, match="too large"):
        load_image(png_header_only(side, side), 64)


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty"),
        (b"GIF89a but not really", "not an image"),
        (b"%PDF-1.4 definitely not", "not an image"),
        (encode(NOISE, "JPEG")[:-4000], "could not decode"),
        (encode(RED, "TIFF"), "unsupported image format TIFF"),
    ],
)
def test_bad_bytes_raise_the_projects_error(data, message):
    with pytest.raises(ImageError, match=message):
        load_image(data, 32)


def test_one_pixel_image_is_fine():
    assert load_image(encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), 16).shape == (16, 16, 3)


def test_payload_decoding():
    raw = encode(RED, "PNG")
    assert decode_payload(raw) == raw
    assert decode_payload(base64.b64encode(raw).decode()) == raw
    assert decode_payload("data:image/png;base64," + base64.b64encode(raw).decode()) == raw
    with pytest.raises(ImageError, match="invalid base64"):
        decode_payload("not base64 at all!")
    with pytest.raises(ImageError, match="expected base64"):
        decode_payload(42)
