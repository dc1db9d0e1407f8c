"""Load: the upload page and the scoring server under concurrent clients, on loopback.

    python -m bench.load [--requests 5000] [--concurrency 16]          # = make load

Starts the scoring server (`mlflow models serve --env-manager local`) on the registered Production
model of ./mlflow.db with its catalogue databases/animal.db (what `make run` makes); without one,
it first makes a small model of its own in bench/results/load/ (reused by later runs). Then it
starts the page under gunicorn (gunicorn.conf.py, 2 workers x 32 threads), warms both up, and sends a fixed number
of requests from `--concurrency` threads, in turn to: the page's POST /api/predict, the page's
POST /predict (the HTML result), the page's GET /images/<id>, and the scoring server's
POST /invocations. Every answer is checked (status and content), not only timed.

It prints requests per second, latency percentiles (p50/p95/p99) per route, the error count, and
the resident memory (VmRSS, summed over each server's processes) after the warm-up and at the
end. Target: zero errors and no server growing by more than 10%. Exit status: 0 target met,
1 errors, 2 memory grew past --max-growth.

`--scoring-url URL` uses a scoring server that is already running (its memory is then not read),
with the catalogue given by `--db`.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import requests

from bench.common import tree_rss_mb
from web.serve import Served, server_env, start_page_server, start_scoring_server

ROOT = Path(__file__).resolve().parents[1]
WORKDIR = ROOT / "bench" / "results" / "load"  # git-ignored
KINDS = ("page /api/predict", "page /predict", "page /images/<id>", "scoring /invocations")
LABELS = {"cat", "dog", "wild"}


# --- the servers --------------------------------------------------------------------------------


def rss_mb(server: Served) -> float:
    """Resident memory of the server and every process it started (gunicorn and uvicorn workers)."""
    return tree_rss_mb(server.process.pid)


def image_store(db: Path) -> Path:
    """The image store the catalogue was populated from: the page is told it (IMAGE_STORE), it
    never takes it from the catalogue itself."""
    from databases import catalogue

    conn = catalogue.connect(db, readonly=True)
    try:
        return catalogue.store_root(conn)
    finally:
        conn.close()


# --- the model ----------------------------------------------------------------------------------


def registered(store: Path, db: Path) -> str | None:
    """The tracking URI of `store` if it has models:/animal/Production and `db` exists."""
    if not (store.is_file() and db.is_file()):  # opening a missing store would create an empty one
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = f"sqlite:///{store}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # stages are deprecated; `make serve` still serves one
            return uri if MlflowClient(uri).get_latest_versions("animal", stages=["Production"]) else None
    except MlflowException:
        return None


def make_model(workdir: Path) -> tuple[str, Path]:
    """A small model of our own: extract, populate, train (64 px, 3 epochs), register."""
    db, store = workdir / "catalogue.db", workdir / "mlflow.db"
    uri = registered(store, db)
    if uri:
        return uri, db
    print(f"no registered model found: making a small one in {workdir} (about a minute, once)", flush=True)
    workdir.mkdir(parents=True, exist_ok=True)
    script = (
        "import mlflow, sys; from pathlib import Path\n"
        "from steps.extract import extract; from steps.populate import populate\n"
        "from steps.train import train; from steps.register import register\n"
        "w = Path(sys.argv[1]); mlflow.set_tracking_uri(f'sqlite:///{w / \"mlflow.db\"}')\n"
        "if mlflow.get_experiment_by_name('load') is None:\n"
        "    mlflow.create_experiment('load', artifact_location=(w / 'artifacts').as_uri())\n"
        "mlflow.set_experiment('load')\n"
        "extract('synthetic', w / 'images', w / 'metadata.csv', images_per_class=40)\n"
        "populate(w / 'metadata.csv', w / 'images', w / 'catalogue.db')\n"
        "register(train(w / 'catalogue.db', image_size=64, epochs=3)[2], w / 'catalogue.db')\n"
    )
    env = server_env()
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("MLFLOW_EXPERIMENT_ID", None)
    subprocess.run([sys.executable, "-c", script, str(workdir)], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    return f"sqlite:///{store}", db


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Results:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)  # the first few errors, for the report
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, kind: str, ms: float, problem: str | None) -> None:
        with self.lock:
            self.latencies_ms[kind].append(ms)
            if problem:
                self.errors[kind] += 1
                if len(self.examples) < 5:
                    self.examples.append(f"{kind}: {problem}")

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.latencies_ms.values())

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class Workload:
    """What the clients send (prepared before the clock starts) and how each answer is checked."""

    def __init__(self, page: str, scoring: str, db: Path, images: int = 24):
        from databases import catalogue

        conn = catalogue.connect(db, readonly=True)
        try:
            frame = catalogue.images(conn)
        finally:
            conn.close()
        if frame.empty:
            raise SystemExit(f"the catalogue {db} has no images")
        val = frame[frame.split == "val"] if (frame.split == "val").any() else frame
        rng = np.random.default_rng(0)
        chosen = val.iloc[rng.permutation(len(val))[:images]]
        self.photos = [Path(f).read_bytes() for f in chosen.file]
        self.image_sizes = {int(i): Path(f).stat().st_size for i, f in zip(frame.id, frame.file)}
        self.ids = list(self.image_sizes)
        self.bodies = [
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(p).decode()]]}, "params": {"k": 6}}).encode()
            for p in self.photos
        ]
        self.page, self.scoring = page, scoring

    def send(self, session: requests.Session, i: int) -> tuple[str, str | None]:
        """Request number i; returns (kind, problem or None)."""
        kind = KINDS[i % len(KINDS)]
        n = i // len(KINDS)
        photo = self.photos[n % len(self.photos)]
        if kind == "page /api/predict":
            response = session.post(f"{self.page}/api/predict", files={"image": ("face.jpg", photo)}, timeout=60)
            ok = response.status_code == 200 and response.json().get("label") in LABELS
        elif kind == "page /predict":
            response = session.post(f"{self.page}/predict", files={"image": ("face.jpg", photo)}, timeout=60)
            ok = response.status_code == 200 and b"data-label>" in response.content
        elif kind == "page /images/<id>":
            image_id = self.ids[(n * 7919) % len(self.ids)]
            response = session.get(f"{self.page}/images/{image_id}", timeout=60)
            ok = response.status_code == 200 and len(response.content) == self.image_sizes[image_id]
        else:
            response = session.post(
                f"{self.scoring}/invocations",
                data=self.bodies[n % len(self.bodies)],
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            ok = response.status_code == 200 and response.json()["predictions"][0]["label"] in LABELS
        return kind, None if ok else f"HTTP {response.status_code}: {response.text[:200]}"


def run(workload: Workload, total: int, concurrency: int) -> Results:
    results, counter = Results(), itertools.count()

    def client() -> None:
        with requests.Session() as session:
            while (i := next(counter)) < total:
                started = time.perf_counter()
                try:
                    kind, problem = workload.send(session, i)
                except (requests.RequestException, ValueError, KeyError, IndexError, TypeError) as error:
                    kind, problem = KINDS[i % len(KINDS)], f"{type(error).__name__}: {error}"
                results.record(kind, (time.perf_counter() - started) * 1000, problem)

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    results.seconds = time.perf_counter() - started
    return results


# --- the report ---------------------------------------------------------------------------------


def table(title: str, headers: list[str], rows: list[list[object]]) -> None:
    print(f"\n### {title}\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row) + " |")


def report(results: Results, memory: dict[str, tuple[float, float] | None], args) -> dict:
    rows, summary = (
        [],
        {
            "requests": results.total,
            "errors": results.error_count,
            "seconds": results.seconds,
            "requests_per_second": results.total / results.seconds,
            "routes": {},
            "memory_mb": {},
        },
    )
    for kind in [*KINDS, "all"]:
        samples = list(itertools.chain(*results.latencies_ms.values())) if kind == "all" else results.latencies_ms.get(kind, [])
        if not samples:
            continue
        p50, p95, p99 = (float(x) for x in np.percentile(samples, [50, 95, 99]))
        errors = results.error_count if kind == "all" else results.errors.get(kind, 0)
        rate = len(samples) / results.seconds
        rows.append([kind, len(samples), errors, rate, p50, p95, p99])
        summary["routes"][kind] = {
            "requests": len(samples),
            "errors": errors,
            "requests_per_second": rate,
            "p50_ms": p50,
            "p95_ms": p95,
            "p99_ms": p99,
        }
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\n{os.cpu_count()} cores, load average {load} (at the end)")
    table(
        f"Load: {results.total:,} requests from {args.concurrency} threads in {results.seconds:.1f} s",
        ["route", "requests", "errors", "req/s", "p50 ms", "p95 ms", "p99 ms"],
        rows,
    )
    memory_rows = []
    for name, values in memory.items():
        if values is None:
            memory_rows.append([name, "not started here", "", ""])
            continue
        before, after = values
        growth = (after - before) / before * 100 if before else 0.0
        memory_rows.append([name, before, after, f"{growth:+.1f}%"])
        summary["memory_mb"][name] = {"before": before, "after": after, "growth_pct": growth}
    table("Resident memory (VmRSS, MB, all processes of each server)", ["server", "after warm-up", "at the end", "growth"], memory_rows)
    for example in results.examples:
        print(f"error: {example}")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=5000, help="requests to measure (after the warm-up)")
    parser.add_argument("--concurrency", type=int, default=16, help="client threads")
    parser.add_argument("--warmup", type=int, default=400, help="requests before the first memory reading")
    parser.add_argument("--model-uri", default="models:/animal/Production")
    parser.add_argument("--tracking-uri", default=None, help="default: ./mlflow.db if it has the model, else our own")
    parser.add_argument("--db", type=Path, default=None, help="the catalogue (default: the model's)")
    parser.add_argument("--scoring-url", default=None, help="use this running scoring server (base URL)")
    parser.add_argument("--page-workers", type=int, default=2)
    parser.add_argument("--page-threads", type=int, default=8)
    parser.add_argument("--max-growth", type=float, default=10.0, help="percent of memory growth allowed")
    parser.add_argument("--workdir", type=Path, default=WORKDIR, help="where a model of our own is kept")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    logs = Path(tempfile.mkdtemp(prefix="animal-load-"))
    servers: list[Served] = []
    try:
        if args.scoring_url:
            scoring_url, db, scoring = args.scoring_url.removesuffix("/invocations"), args.db, None
            db = db or ROOT / "databases" / "animal.db"
        else:
            tracking_uri, db = args.tracking_uri, args.db
            if tracking_uri is None:
                tracking_uri = registered(ROOT / "mlflow.db", ROOT / "databases" / "animal.db")
                db = db or (ROOT / "databases" / "animal.db" if tracking_uri else None)
            if tracking_uri is None:
                tracking_uri, own_db = make_model(args.workdir)
                db = db or own_db
            db = db or ROOT / "databases" / "animal.db"
            print(f"model {args.model_uri} of {tracking_uri}, catalogue {db}", flush=True)
            scoring = start_scoring_server(args.model_uri, tracking_uri=tracking_uri, log=logs / "scoring.log")
            servers.append(scoring)
            scoring_url = scoring.url
        page = start_page_server(
            scoring_url,
            db=db,
            image_store=image_store(Path(db)),
            workers=args.page_workers,
            threads=args.page_threads,
            log=logs / "page.log",
        )
        servers.append(page)
        for server in servers:
            server.wait()
        if not scoring:
            requests.get(f"{scoring_url}/ping", timeout=10).raise_for_status()
        workload = Workload(page.url, scoring_url, Path(db))

        warm = run(workload, args.warmup, args.concurrency) if args.warmup else Results()
        if warm.error_count:
            print(f"warm-up: {warm.error_count} errors", *warm.examples, sep="\n  ")
        before = {"page (gunicorn)": rss_mb(page), "scoring server": rss_mb(scoring) if scoring else None}
        results = run(workload, args.requests, args.concurrency)
        memory = {
            "page (gunicorn)": (before["page (gunicorn)"], rss_mb(page)),
            "scoring server": (before["scoring server"], rss_mb(scoring)) if scoring else None,
        }
    finally:
        for server in reversed(servers):
            server.stop()

    summary = report(results, memory, args)
    grown = [name for name, m in summary["memory_mb"].items() if m["growth_pct"] > args.max_growth]
    summary["target_met"] = not results.error_count and not grown
    print(
        f"\ntarget (zero errors, memory growth at most {args.max_growth:g}%): "
        + ("met" if summary["target_met"] else f"NOT met ({results.error_count} errors{', grew: ' + ', '.join(grown) if grown else ''})")
    )
    print(f"server logs: {logs}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 1 if results.error_count else 2 if grown else 0


if __name__ == "__main__":
    sys.exit(main())
