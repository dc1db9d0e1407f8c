"""The one preprocessing function: image file bytes -> square uint8 RGB array.

Training (steps/train.py) and serving (pyfunc/model.py) both call `load_image`, so a photo is
decoded, oriented, converted and resized the same way in both: no train/serve skew.
"""
from __future__ import annotations

import base64
import binascii
import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Far above any real photo (AFHQ is 512x512), far below what exhausts memory when decoded.
MAX_PIXELS = 40_000_000
FORMATS = {"JPEG", "MPO", "PNG", "WEBP", "BMP", "GIF"}
# Transparent pixels are shown on white, as a browser shows them.
BACKGROUND = (255, 255, 255)


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
    """
    image = open_image(data, max_pixels)
    try:
        image.draft("RGB", (image_size, image_size))  # JPEG: decode at a reduced scale, much faster
        image = ImageOps.exif_transpose(image)
        image = ImageOps.fit(_to_rgb(image), (image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ImageError(f"could not decode image: {error}") from None


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


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # 16-bit (or float) grey: scale to 8 bits instead of clipping everything above 255.
        pixels = np.asarray(image, dtype=np.float64)
        scale = 255.0 / 65535.0 if pixels.max(initial=0) > 255 else 1.0
        image = Image.fromarray(np.clip(pixels * scale, 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")
