"""Serving: end-to-end HTTP latency and throughput of `mlflow models serve`, ours vs the naive way.

Both servers are the real `mlflow models serve --env-manager local` on loopback, started the same
way (same worker count) from the same Keras model: ours is the registered `animal` pyfunc (one
preprocessing pass, one forward call for the whole request, similar images included); the
baseline (bench/baseline/) decodes with PIL and calls `model.predict` per image, as tutorials do,
and answers the label only. Clients are threads with one requests.Session each; every request
carries a real catalogue image as base64 JSON, prepared before the clock starts.

    python -m bench.serving [--model-uri models:/animal/Production] [--requests 400]
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import RESULTS, catalogue_rows, machine, percentiles, setup, table
from steps import defaults
from web.serve import Served, start_scoring_server

WAYS = ("ours", "baseline")


@dataclass
class Load:
    """What one way did at one concurrency."""

    latencies_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    errors: int = 0

    @property
    def throughput(self) -> float:
        return len(self.latencies_ms) / self.seconds


def request_body(images: list[bytes]) -> bytes:
    rows = [[base64.b64encode(data).decode("ascii")] for data in images]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode()


def run_load(url: str, bodies: list[bytes], concurrency: int, total: int) -> Load:
    """`total` requests from `concurrency` threads, each sending its share back to back."""
    import requests

    def client(worker: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with requests.Session() as session:
            for i in range(worker, total, concurrency):
                start = time.perf_counter()
                response = session.post(
                    f"{url}/invocations", data=bodies[i % len(bodies)], headers={"Content-Type": "application/json"}, timeout=120
                )
                latencies.append((time.perf_counter() - start) * 1000)
                errors += not response.ok
        return latencies, errors

    load = Load()
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for latencies, errors in pool.map(client, range(concurrency)):
            load.latencies_ms += latencies
            load.errors += errors
    load.seconds = time.perf_counter() - start
    return load


def plot(results: dict[tuple[str, int], Load], levels: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, len(levels), figsize=(4 * len(levels), 3.4), sharey=True)
    for ax, level in zip(np.atleast_1d(axes), levels):
        for way in WAYS:
            samples = np.sort(results[way, level].latencies_ms)
            ax.plot(samples, np.arange(1, len(samples) + 1) / len(samples), label=way)
        ax.set(xscale="log", xlabel="latency (ms, log scale)", title=f"concurrency {level}")
        ax.grid(alpha=0.3, which="both")
    np.atleast_1d(axes)[0].set_ylabel("fraction of requests")
    np.atleast_1d(axes)[0].legend()
    figure.suptitle("End-to-end HTTP latency, single image (CDF)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def report(results: dict[tuple[str, int], Load], batches: dict[str, Load], levels: list[int], batch_size: int) -> None:
    rows = []
    for level in levels:
        for way in WAYS:
            load, p = results[way, level], percentiles(results[way, level].latencies_ms)
            ratio = load.throughput / results["baseline", level].throughput
            rows.append([level, way, p["p50"], p["p95"], p["p99"], load.throughput, f"{ratio:.1f}x", load.errors])
    table(
        "Single image, end to end over HTTP",
        ["concurrency", "way", "p50 ms", "p95 ms", "p99 ms", "requests/s", "throughput vs baseline", "errors"],
        rows,
    )
    p50 = {way: percentiles(load.latencies_ms)["p50"] for way, load in batches.items()}
    table(
        f"One request of {batch_size} images",
        ["way", "p50 ms", "ms per image", "speed-up", "errors"],
        [[way, p50[way], p50[way] / batch_size, f"{p50['baseline'] / p50[way]:.1f}x", batches[way].errors] for way in WAYS],
    )
    single = percentiles(results["ours", levels[0]].latencies_ms)["p50"]
    worst = min(results["ours", level].throughput / results["baseline", level].throughput for level in levels)
    print(
        f"\ntargets: single-image p50 at concurrency {levels[0]}: {single:.1f} ms (target <= 15 ms: "
        f"{'met' if single <= 15 else 'missed'}); throughput vs baseline, lowest over levels: {worst:.1f}x "
        f"(target >= 3x: {'met' if worst >= 3 else 'missed'})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="default: models:/animal/Production (made here if none)")
    parser.add_argument("--db", type=Path, help="its catalogue, with --model-uri (default: databases/animal.db)")
    parser.add_argument("--requests", type=int, default=400, help="single-image requests per concurrency level")
    parser.add_argument("--levels", default="1,4,16", help="client concurrency levels")
    parser.add_argument("--batches", type=int, default=20, help="requests of --batch-size images")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=40, help="unmeasured requests per server first")
    parser.add_argument("--workers", type=int, default=1, help="server workers, the same for both")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "pipeline", help="where to make a model if none is registered")
    parser.add_argument("--images-per-class", type=int, default=defaults.IMAGES_PER_CLASS)
    parser.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    parser.add_argument("--plot", type=Path, default=RESULTS / "serving_latency.png")
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]

    from bench.baseline.save import save_baseline

    model = setup(args.model_uri, args.workdir, args.images_per_class, epochs=args.epochs, db=args.db)
    val = catalogue_rows(model.db, split="val")
    images = [Path(f).read_bytes() for f in val.file.iloc[:64]]
    singles = [request_body([data]) for data in images]
    batch = [request_body([images[(i + j) % len(images)] for j in range(args.batch_size)]) for i in range(4)]
    print(
        f"machine: {machine()}\nmodel: {model.model_uri} from {model.origin}; "
        f"{len(images)} distinct images, mean {sum(map(len, images)) / len(images) / 1024:.1f} KiB",
        flush=True,
    )

    results: dict[tuple[str, int], Load] = {}
    batches: dict[str, Load] = {}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        baseline = save_baseline(model.model_uri, Path(tmp) / "baseline")
        servers: dict[str, Served] = {}
        for way, uri in (("ours", model.model_uri), ("baseline", str(baseline))):
            # Both start at once and are waited for afterwards: neither waits for the other to load.
            servers[way] = start_scoring_server(uri, tracking_uri=model.tracking_uri, workers=args.workers, log=Path(tmp) / f"{way}.log")
            stack.callback(servers[way].stop)
        for server in servers.values():
            server.wait()
            run_load(server.url, singles, 2, args.warmup)  # first calls build graphs, fill caches
            run_load(server.url, batch, 1, 2)
        # The two ways alternate level by level, so that a change in the machine's load hits both.
        for level in levels:
            for way, server in servers.items():
                results[way, level] = run_load(server.url, singles, level, args.requests)
        for way, server in servers.items():
            batches[way] = run_load(server.url, batch, 1, args.batches)

    report(results, batches, levels, args.batch_size)
    plot(results, levels, args.plot)
    print(f"plot: {args.plot}")
    return 1 if any(load.errors for load in [*results.values(), *batches.values()]) else 0


if __name__ == "__main__":
    sys.exit(main())
