"""What a 1,000-row request leaves in the scoring server's memory, and how much of it glibc keeps.

    python -m bench.row_memory [--requests 3]

Part 1, over HTTP: starts `mlflow models serve` (web.serve) on the small model of bench/load.py
(made once in bench/results/load/), warms it up with 8 rows, then sends `--requests` requests of
pyfunc.model.MAX_ROWS catalogue images and prints the server's resident memory (all its processes)
after each. Part 2, in this process: the same model loaded with mlflow.pyfunc, the same 1,000 rows
predicted, resident memory after the prediction and after glibc's malloc_trim(0), which returns
freed heap pages to the system: the difference is memory the allocator keeps, not memory in use.
"""

from __future__ import annotations

import argparse
import base64
import ctypes
import ctypes.util
import json
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import requests

from bench.common import machine, peak_rss_mb, table
from bench.load import WORKDIR, make_model, rss_mb
from pyfunc.model import MAX_ROWS
from web.serve import scoring_server


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rows_of(db: Path) -> list[str]:
    from bench.common import catalogue_rows

    files = catalogue_rows(db).file[:50]
    b64 = [base64.b64encode(Path(f).read_bytes()).decode() for f in files]
    return [b64[i % len(b64)] for i in range(MAX_ROWS)]


def over_http(tracking_uri: str, values: list[str], requests_: int) -> list[list[object]]:
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}, "params": {"k": 5}})
    warm = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values[:8]]}, "params": {"k": 5}})
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        scoring_server("models:/animal/Production", tracking_uri=tracking_uri, log=Path(tmp) / "s.log") as server,
    ):
        headers = {"Content-Type": "application/json"}
        requests.post(f"{server.url}/invocations", data=warm, headers=headers, timeout=300).raise_for_status()
        time.sleep(2)
        rows.append(["after 8 rows (warm-up)", rss_mb(server)])
        for n in range(1, requests_ + 1):
            requests.post(f"{server.url}/invocations", data=body, headers=headers, timeout=300).raise_for_status()
            time.sleep(2)
            rows.append([f"after {n} x {MAX_ROWS:,} rows", rss_mb(server)])
    return rows


def in_process(tracking_uri: str, values: list[str]) -> list[list[object]]:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    model = mlflow.pyfunc.load_model("models:/animal/Production")
    trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    model.predict(pd.DataFrame({"image": values[:8]}), params={"k": 5})
    trim(0)
    rows = [["after 8 rows, trimmed", current_rss_mb()]]
    for n in (1, 2):
        model.predict(pd.DataFrame({"image": values}), params={"k": 5})
        rows.append([f"after {n} x {MAX_ROWS:,} rows", current_rss_mb()])
        trim(0)
        rows.append(["  then malloc_trim(0)", current_rss_mb()])
    rows.append(["peak", peak_rss_mb()])
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    tracking_uri, db = make_model(WORKDIR)
    values = rows_of(db)
    table(
        "The scoring server (mlflow models serve), VmRSS of all its processes",
        ["after", "MB"],
        over_http(tracking_uri, values, args.requests),
    )
    table("The same model in this process, VmRSS", ["after", "MB"], in_process(tracking_uri, values))
    print(f"\nmachine at the end: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
