"""Limits of one request to the scoring server, measured: what docs/reliability.md quotes.

    python -m bench.limits [--model-uri URI --tracking-uri URI]

Starts `mlflow models serve` (web.serve) on the registered Production model of ./mlflow.db, or
on a small model of its own made once in bench/results/load/ (as `make load` does), and measures
over HTTP: the time of the largest request it accepts in rows (pyfunc.model.MAX_ROWS catalogue
images) and in pixels (MAX_REQUEST_PIXELS of 40 MP RGBA PNGs), how fast it refuses one row more
and the probe's 50,000 one-pixel rows, and the scoring server's resident memory (all its
processes, sampled every 20 ms) while six 40 MP 16-bit grey PNGs are scored at once, and after.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

from bench.common import ROOT, machine, table
from bench.decoding import _size, grey_16_bit_png, rgba_png
from bench.load import WORKDIR, make_model, registered, rss_mb
from pyfunc.model import MAX_REQUEST_PIXELS, MAX_ROWS
from web.serve import Served, scoring_server


def post(url: str, values: list[str], timeout: float = 300) -> tuple[int, float, str]:
    """(status, seconds, the start of the answer) for one request of these base64 images."""
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}, "params": {"k": 5}})
    started = time.perf_counter()
    response = requests.post(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"}, timeout=timeout)
    return response.status_code, time.perf_counter() - started, response.text[:160]


def sample_peak(server: Served, stop: threading.Event, peak: list[float]) -> None:
    while not stop.wait(0.02):
        peak[0] = max(peak[0], rss_mb(server))


def measure(server: Served, photos: list[bytes]) -> list[list[object]]:
    url, rows = server.url, []
    b64 = [base64.b64encode(p).decode() for p in photos]
    post(url, b64[:8])  # warm-up: the first call builds the graph
    catalogue_rows = [b64[i % len(b64)] for i in range(MAX_ROWS)]
    for label, values in (
        (f"{MAX_ROWS:,} catalogue images (the most rows)", catalogue_rows),
        (f"{MAX_ROWS + 1:,} catalogue images", catalogue_rows + b64[:1]),
    ):
        status, seconds, text = post(url, values)
        rows.append([label, status, seconds, text[:90] if status != 200 else ""])
    pixel = base64.b64encode(_one_pixel_png()).decode()
    status, seconds, text = post(url, [pixel] * 50_000)
    rows.append(["50,000 one-pixel PNGs (the probe's)", status, seconds, text[:90]])

    width, height = _size(40)
    big = base64.b64encode(rgba_png(width, height)).decode()
    fits = MAX_REQUEST_PIXELS // (width * height)
    for count in (fits, fits + 1):
        status, seconds, text = post(url, [big] * count)
        rows.append(
            [
                f"{count} RGBA PNGs of {width}x{height} ({count * width * height / 1e6:,.0f} MP)",
                status,
                seconds,
                text[:90] if status != 200 else "",
            ]
        )
    return rows


def _one_pixel_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (1, 1), (1, 2, 3)).save(buffer, "PNG")
    return buffer.getvalue()


def memory(server: Served, concurrent: int = 6) -> list[object]:
    """Resident memory before, at the peak and after `concurrent` 40 MP 16-bit grey PNGs at once."""
    width, height = _size(40)
    grey = base64.b64encode(grey_16_bit_png(width, height)).decode()
    time.sleep(1)
    before = rss_mb(server)
    stop, peak = threading.Event(), [before]
    sampler = threading.Thread(target=sample_peak, args=(server, stop, peak), daemon=True)
    sampler.start()
    with ThreadPoolExecutor(concurrent) as pool:
        statuses = [f.result()[0] for f in [pool.submit(post, server.url, [grey]) for _ in range(concurrent)]]
    stop.set()
    sampler.join()
    time.sleep(2)
    return [
        f"{concurrent} x 40 MP 16-bit grey PNG at once (HTTP {', '.join(map(str, sorted(set(statuses))))})",
        before,
        peak[0],
        rss_mb(server),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", default="models:/animal/Production")
    parser.add_argument("--tracking-uri", default=None, help="default: ./mlflow.db if it has the model, else our own")
    args = parser.parse_args(argv)
    tracking_uri, db = args.tracking_uri, None
    if tracking_uri is None:
        tracking_uri = registered(ROOT / "mlflow.db", ROOT / "databases" / "animal.db")
        db = ROOT / "databases" / "animal.db" if tracking_uri else None
    if tracking_uri is None:
        tracking_uri, db = make_model(WORKDIR)
    from bench.common import catalogue_rows

    frame = catalogue_rows(db or ROOT / "databases" / "animal.db")
    photos = [Path(f).read_bytes() for f in frame.file[:50]]
    print(
        f"machine: {machine()}\nmodel: {args.model_uri} of {tracking_uri}; catalogue images "
        f"{math.fsum(map(len, photos)) / len(photos) / 1024:.1f} KiB on average",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        scoring_server(args.model_uri, tracking_uri=tracking_uri, log=Path(tmp) / "scoring.log") as server,
    ):
        mem = memory(server)  # first: the server as it starts, as the probe measured it
        rows = measure(server, photos)
        after_all = rss_mb(server)
    table("One request to the scoring server", ["request", "HTTP", "seconds", "answer"], rows)
    table("Scoring server memory (VmRSS of all its processes, MB)", ["load", "before", "peak", "after"], [mem])
    print(f"\nresident memory after all the requests above: {after_all:,.0f} MB")
    print(f"\nmachine at the end: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
