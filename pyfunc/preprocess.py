"""The one preprocessing function: image file bytes -> square uint8 RGB array.

Training (steps/train.py) and serving (pyfunc/model.py) both call `load_image`, so a photo is
decoded, oriented, converted and resized the same way in both: no train/serve skew.
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import ctypes.util
import io
import sys

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

# Far above any real photo (AFHQ is 512x512), far below what exhausts memory when decoded.
MAX_PIXELS = 40_000_000
FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF"}
# Transparent pixels are shown on white, as a browser shows them.
BACKGROUND = (255, 255, 255)
# The most memory decoding takes, per pixel of the image (measured: bench/decoding.py).
BYTES_PER_PIXEL = 8
GIVE_BACK_ABOVE = 4_000_000  # pixels: after decoding a bigger image, freed memory goes back to the system
# glibc's malloc_trim (None elsewhere: musl, macOS, Windows).
_MALLOC_TRIM = getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None) if sys.platform == "linux" else None
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
# EXIF orientation -> the transposition that shows the image upright (as ImageOps.exif_transpose).
ORIENTATIONS = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageError(ValueError):
    """The input is not an image this project can use; the message says why."""


def decode_payload(value: bytes | bytearray | str) -> bytes:
    """The `image` cell of a request: raw bytes, or base64 text (a `data:` URL prefix is allowed)."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if not isinstance(value, str):
        raise ImageError(f"expected base64 text or bytes, got {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("invalid base64 in the image column") from None


def load_image(data: bytes, image_size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes into an (image_size, image_size, 3) uint8 RGB array.

    EXIF orientation is applied, the first frame of an animation is used, any mode (L, LA, P,
    RGBA, CMYK, 16-bit) becomes RGB, and the centre square is resized. Raises ImageError.

    Memory: the full-size image is decoded once, in its own mode, and every full-size step
    replaces it (the old pixels are freed as the new ones are made); the square is cut and resized
    before the colour conversion and the transparency, so the peak stays within BYTES_PER_PIXEL
    bytes per pixel of the image (bench/decoding.py, docs/reliability.md).
    """
    image = open_image(data, max_pixels)
    try:
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, much faster
        transpose = ORIENTATIONS.get(image.getexif().get(ExifTags.Base.Orientation, 1))
        if transpose is not None:  # upright first, as training sees it (ImageOps.exif_transpose's order)
            image = image.transpose(transpose)
        image = _resizable(image)
        small = ImageOps.fit(image, (image_size, image_size), Image.Resampling.BILINEAR)
        divisor = _to_8_bits(image)
        pixels = image.width * image.height
        del image  # the full-size pixels, before the small ones are converted
        if pixels > GIVE_BACK_ABOVE:
            _give_back_memory()
        return np.asarray(_to_rgb(small, divisor), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"could not decode image: {error}") from None


def request_problem(values, max_rows: int, max_pixels: int) -> str | None:
    """Why a request of these `image` cells is too big to answer within the scoring server's
    timeout (too many rows, or more pixels in all than `max_pixels`, read from the headers), or
    None. Unreadable cells are left for their own row's error."""
    if len(values) > max_rows:
        return f"too many rows: {len(values):,} in one request (at most {max_rows:,}); score large batches with `mlflow run . -e score`"
    total = 0
    for value in values:
        try:
            width, height = open_image(decode_payload(value)).size
        except ImageError:
            continue
        total += width * height
        if total > max_pixels:
            return (
                f"too many pixels in one request (over {max_pixels:,} in all); send fewer or smaller "
                "images per request, or score them with `mlflow run . -e score`"
            )
    return None


def open_image(data: bytes, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open image bytes from their header only: format and size are checked, no pixel is decoded,
    so a decompression bomb never expands. Raises ImageError."""
    if not data:
        raise ImageError("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:  # Pillow's own limit, far above ours
        raise ImageError(f"image too large (limit {max_pixels:,} pixels)") from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise ImageError("not an image (JPEG, PNG, WebP, BMP or GIF expected)") from None
    if image.format not in FORMATS:
        raise ImageError(f"unsupported image format {image.format} (JPEG, PNG, WebP, BMP or GIF expected)")
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} pixels (limit {max_pixels:,})")
    return image


def _give_back_memory() -> None:
    """Return freed pages to the system. Pillow frees a large image in blocks that glibc keeps
    for reuse: without this a scoring server stays hundreds of MB larger after a few big photos."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _resizable(image: Image.Image) -> Image.Image:
    """The image in a mode Pillow resizes by interpolation (palette and bilevel images it would
    only subsample): palette images become RGB(A), 4 bytes per pixel on top of their 1."""
    transparent = image.mode == "PA" or "transparency" in image.info  # a palette entry or a colour key
    if image.mode in ("P", "PA", "1", "L", "RGB") and transparent:
        return image.convert("RGBA")  # before resizing: a colour key means nothing once pixels blend
    if image.mode == "P":
        return image.convert("RGB")
    if image.mode == "1":
        return image.convert("L")
    return image


def _to_8_bits(image: Image.Image) -> int | None:
    """For 16-bit (or 32-bit) grey: the divisor that maps the image's range onto 0..255 (65535/255
    when any value exceeds 255, else 1: it already is 8-bit data), from the full image's extrema."""
    if image.mode not in WIDE_MODES:
        return None
    high = image.getextrema()[1]
    return 257 if high > 255 else 1


def _to_rgb(image: Image.Image, divisor: int | None) -> Image.Image:
    if divisor is not None:
        # Integer arithmetic on the small square: no float64 copy of a 16-bit image.
        wide = np.asarray(image, dtype=np.int64)
        image = Image.fromarray(np.clip(wide // divisor, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
