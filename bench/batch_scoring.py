"""Batch scoring: `score` (local engine, Spark engine) vs the naive way, on AFHQ-sized photos.

    python -m bench.batch_scoring [--images 1000] [--size 512] [--model-uri URI] [--no-spark]

The photos: synthetic faces drawn at 512x512 (AFHQ's size) and saved as JPEGs, cached under
bench/results/batch_scoring/. Each way runs in its own processes, one after the other:

- ours: `python -m steps.score` (local engine): readers ahead, the pyfunc on every core.
- naive: `mlflow models serve` (one worker) of the same model and one HTTP request per image, as
  the seed's client did (a keep-alive session, base64 JSON, one image at a time).
- spark: `python -m steps.score --engine spark --spark-master local[*]` (bench/spark_scoring.py
  separates its start-up from its steady state).

images/s counts the scoring itself (ours and Spark: the job's own figure, model loading in the job
included for Spark, whose workers load it; naive: the request loop once the server answers). Peak
memory is the sum of resident memory over the way's whole process tree (Python, the JVM and
Spark's Python workers, the server and its workers), sampled every 0.2 s. "ours x4" scores four
times as many files (copies made distinct by a trailer after the JPEG end marker, so none is
skipped as a duplicate): the same peak shows that memory does not grow with the collection.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from bench.common import RESULTS, ROOT, machine, setup, table, tree_rss_mb
from web.serve import server_env

WORKDIR = RESULTS / "batch_scoring"
SCORED = re.compile(r"\(([\d,]+) scored now in ([\d.]+) s")
LABEL_COUNT = re.compile(r"\b(cat|dog|wild) ([\d,]+)\b")  # the summary's "cat 1,468 · wild 31"


@dataclass
class Measured:
    way: str
    images: int
    seconds: float  # scoring only
    wall: float  # including start-up (interpreter, model, server or Spark)
    peak_mb: float
    errors: int
    unfamiliar: int | None = None  # flagged unfamiliar, where the model answers it
    labels: dict[str, int] | None = None  # answers per label, as `score` counted them

    @property
    def per_second(self) -> float:
        return self.images / self.seconds


def photos(folder: Path, count: int, size: int) -> list[Path]:
    """`count` synthetic faces drawn at size x size, as JPEGs (made once, then reused)."""
    from steps.synthetic import draw_face

    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(count):
        label = ("cat", "dog", "wild")[i % 3]
        path = folder / f"{label}_{i:05d}.jpg"
        if not path.exists():
            image, _ = draw_face(label, [2026, i], size=size)
            temporary = path.with_suffix(".tmp")
            image.save(temporary, "JPEG", quality=90)
            os.replace(temporary, path)
        files.append(path)
    return files


def distinct_copies(files: list[Path], folder: Path, copies: int) -> None:
    """`copies` copies of each file with a different trailer after the JPEG's end: the same pixels,
    another sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    for copy in range(copies):
        for path in files:
            target = folder / f"{copy}_{path.name}"
            if not target.exists():
                target.write_bytes(path.read_bytes() + f"copy {copy}".encode())


class TreeMemory:
    """Peak resident memory of a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.2):
        self.pid, self.every, self.peak_mb = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(self.pid))
            self._stop.wait(self.every)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


def run_score(way: str, source: Path, model_uri: str, tracking_uri: str, *extra: str) -> Measured:
    output = WORKDIR / f"{way.split()[0]}.parquet"
    for stale in (output, output.with_name(output.name + ".partial")):
        subprocess.run(["rm", "-rf", str(stale)], check=True)
    command = [sys.executable, "-m", "steps.score", "--input", str(source), "--output", str(output), "--model-uri", model_uri, *extra]
    env = server_env(MLFLOW_TRACKING_URI=tracking_uri)
    started = time.monotonic()
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    memory = TreeMemory(process.pid)
    stdout, _ = process.communicate()
    wall, peak = time.monotonic() - started, memory.stop()
    found = SCORED.search(stdout)
    if process.returncode != 0 or not found:
        raise RuntimeError(f"{way} failed (exit code {process.returncode}):\n{stdout[-2000:]}")
    errors = re.search(r"errors ([\d,]+)", stdout)
    unfamiliar = re.search(r"unfamiliar ([\d,]+)", stdout)
    return Measured(
        way,
        int(found.group(1).replace(",", "")),
        float(found.group(2)),
        wall,
        peak,
        int(errors.group(1).replace(",", "")) if errors else 0,
        int(unfamiliar.group(1).replace(",", "")) if unfamiliar else None,
        {label: int(n.replace(",", "")) for label, n in LABEL_COUNT.findall(stdout)},
    )


def run_naive(files: list[Path], model_uri: str) -> Measured:
    """One HTTP request per image to `mlflow models serve`, as the seed's client did."""
    from web.serve import scoring_server

    started = time.monotonic()
    # Its request log goes to a file: it would bury the table.
    with scoring_server(model_uri, log=WORKDIR / "naive_server.log") as server:
        memory = TreeMemory(server.process.pid)
        session = requests.Session()
        errors = 0

        def ask(path: Path) -> None:
            nonlocal errors
            body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(path.read_bytes()).decode("ascii")]]}}
            reply = session.post(f"{server.url}/invocations", json=body, timeout=60)
            errors += not reply.ok or reply.json()["predictions"][0].get("error") is not None

        for path in files[:20]:  # warm-up, not measured
            ask(path)
        begin = time.monotonic()
        for path in files:
            ask(path)
        seconds = time.monotonic() - begin
        peak = memory.stop()
    return Measured("naive: one HTTP request per image", len(files), seconds, time.monotonic() - started, peak, errors)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--size", type=int, default=512, help="pixels per side (AFHQ: 512)")
    parser.add_argument("--copies", type=int, default=4, help="the memory check: ours on this many times the files")
    parser.add_argument("--model-uri", help="default: the project's Production model (bench/common.py)")
    parser.add_argument("--no-spark", action="store_true")
    args = parser.parse_args(argv)

    model = setup(args.model_uri)
    os.environ["MLFLOW_TRACKING_URI"] = model.tracking_uri
    folder = WORKDIR / f"images_{args.size}"
    files = photos(folder, args.images, args.size)
    megabytes = sum(path.stat().st_size for path in files) / len(files) / 1024
    print(
        f"{len(files)} JPEGs of {args.size}x{args.size}, {megabytes:.0f} KB on average, in {folder}; "
        f"model {model.model_uri} ({model.origin})",
        flush=True,
    )

    load_before = machine()
    results = [run_score("ours: score, local engine", folder, model.model_uri, model.tracking_uri)]
    results.append(run_naive(files, model.model_uri))
    if not args.no_spark:
        results.append(run_score("spark: score --engine spark, local[*]", folder, model.model_uri, model.tracking_uri, "--engine", "spark"))
    if args.copies > 1:
        many = WORKDIR / f"images_{args.size}_x{args.copies}"
        distinct_copies(files, many, args.copies)
        results.append(run_score(f"ours x{args.copies}: score, local engine", many, model.model_uri, model.tracking_uri))
    naive = next(r for r in results if r.way.startswith("naive"))
    table(
        f"Batch scoring, {args.size}x{args.size} JPEGs ({machine()}; before: {load_before})",
        ["way", "images", "scoring s", "images/s", "vs naive", "wall s (with start-up)", "peak RSS MB", "errors"],
        [
            [r.way, f"{r.images:,}", r.seconds, r.per_second, f"{r.per_second / naive.per_second:.1f}x", r.wall, r.peak_mb, r.errors]
            for r in results
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
