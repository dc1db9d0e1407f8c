"""Memory per image: the peak that decoding one image takes, for the formats that cost the most.

    python -m bench.decoding [--megapixels 40]

Each image is made here, written to a file, then decoded by `pyfunc.preprocess.load_image` in a
fresh process whose peak resident memory (VmHWM, reset just before) is compared with its memory
before: what one image adds to a scoring server, in bytes per pixel of the image. The bound the
project states (docs/reliability.md) is pyfunc.preprocess.BYTES_PER_PIXEL; tests/
test_reliability_memory.py checks it on smaller images.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bench.common import ROOT, machine, table
from steps import defaults

MEASURE = r"""
import json, sys
from pyfunc.preprocess import load_image

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

data = open(sys.argv[1], "rb").read()
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS: the peak from here on
before = status("VmRSS")
load_image(data, int(sys.argv[2]))
print(json.dumps({"before_kb": before, "peak_kb": status("VmHWM")}))
"""


def _size(megapixels: float) -> tuple[int, int]:
    """A 4:3 image of about `megapixels` million pixels."""
    height = int(math.sqrt(megapixels * 1e6 * 3 / 4))
    return int(megapixels * 1e6 / height), height


def _gradient(width: int, height: int, high: int) -> np.ndarray:
    """Smooth, so the files stay small (as the probe's 78 KB, 40 MP PNG), yet every value varies."""
    return np.add.outer(np.arange(height, dtype=np.uint32) * 7, np.arange(width, dtype=np.uint32) * 3) % high


def grey_16_bit_png(width: int, height: int) -> bytes:
    return _save(Image.fromarray(_gradient(width, height, 65536).astype(np.uint16)), "PNG")


def cmyk_jpeg(width: int, height: int) -> bytes:
    return _save(Image.new("CMYK", (width, height), (10, 200, 30, 40)), "JPEG", quality=90)


def palette_alpha_png(width: int, height: int) -> bytes:
    image = Image.fromarray(_gradient(width, height, 256).astype(np.uint8), "P")
    image.putpalette([v for i in range(256) for v in (i, 255 - i, (3 * i) % 256)])
    return _save(image, "PNG", transparency=0)


def rgba_png(width: int, height: int) -> bytes:
    grey = Image.fromarray(_gradient(width, height, 256).astype(np.uint8), "L")
    image = Image.merge("RGBA", (grey, grey, grey, grey))
    return _save(image, "PNG")


def rgb_png(width: int, height: int) -> bytes:
    grey = Image.fromarray(_gradient(width, height, 256).astype(np.uint8), "L")
    return _save(Image.merge("RGB", (grey, grey, grey)), "PNG")


def palette_gif(width: int, height: int) -> bytes:
    image = Image.fromarray(_gradient(width, height, 256).astype(np.uint8), "P")
    image.putpalette([v for i in range(256) for v in (i, i, 255 - i)])
    return _save(image, "GIF", transparency=0)


def rotated_rgba_png(width: int, height: int) -> bytes:
    """Stored on its side with an EXIF orientation tag: turned upright at full size."""
    grey = Image.fromarray(_gradient(height, width, 256).astype(np.uint8), "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(Image.merge("RGBA", (grey, grey, grey, grey)), "PNG", exif=exif)


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


FORMATS: dict[str, Callable[[int, int], bytes]] = {
    "16-bit grey PNG": grey_16_bit_png,
    "CMYK JPEG": cmyk_jpeg,
    "palette + alpha PNG": palette_alpha_png,
    "palette + transparency GIF": palette_gif,
    "RGBA PNG": rgba_png,
    "RGB PNG": rgb_png,
    "EXIF-rotated RGBA PNG": rotated_rgba_png,
}


def peak_bytes(data: bytes, image_size: int = defaults.IMAGE_SIZE, root: Path = ROOT) -> int:
    """The peak memory (bytes) that decoding `data` adds to a fresh process (with the project's
    code at `root`: another checkout compares an older version)."""
    with tempfile.NamedTemporaryFile(suffix=".img") as file:
        file.write(data)
        file.flush()
        result = subprocess.run(
            [sys.executable, "-c", MEASURE, file.name, str(image_size)], cwd=root, capture_output=True, text=True, check=True
        )
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    return (figures["peak_kb"] - figures["before_kb"]) * 1024


def measure(megapixels: float, formats: list[str] | None = None, root: Path = ROOT) -> list[dict]:
    width, height = _size(megapixels)
    rows = []
    for name in formats or list(FORMATS):
        data = FORMATS[name](width, height)
        peak = peak_bytes(data, root=root)
        rows.append(
            {
                "format": name,
                "width": width,
                "height": height,
                "file_bytes": len(data),
                "peak_bytes": peak,
                "bytes_per_pixel": peak / (width * height),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--megapixels", type=float, default=40.0)
    parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose preprocessing is measured")
    args = parser.parse_args(argv)
    print(f"machine: {machine()}\ncode: {args.root}", flush=True)
    rows = measure(args.megapixels, root=args.root)
    table(
        f"Peak memory of decoding one {args.megapixels:g} MP image (fresh process, VmHWM)",
        ["format", "size", "file", "peak MB", "bytes per pixel"],
        [
            [r["format"], f"{r['width']}x{r['height']}", f"{r['file_bytes'] / 1024:,.0f} KB", r["peak_bytes"] / 2**20, r["bytes_per_pixel"]]
            for r in rows
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
