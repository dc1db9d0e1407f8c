"""Scoring on Spark vs the local engine: start-up and steady-state throughput, on AFHQ-sized images.

    python -m bench.spark_scoring [--images 10000] [--size 512] [--model-uri URI] [--ways local,local2,standalone]

The images: `steps.extract` synthetic faces at 512x512 (AFHQ's size), cached under
bench/results/spark_scoring/. The model: --model-uri, else the project's Production model, else
a default CNN trained for 2 epochs on 60 images per class (bench/common.py setup: its accuracy
does not matter here, its arithmetic per image is the default CNN's).

Each way runs in its own process (`--one WAY`), one after the other:
- local: the local engine (steps/score.py score_local), readers ahead and the pyfunc on every core;
- local2: the Spark engine on `local[2]`;
- standalone: the Spark engine on a standalone cluster of two 1-core workers on loopback, started
  by steps/spark_cluster.py as `make spark-up` starts it (its own start-up is reported apart).

Start-up is the time from the process's start until every core has scored its first images: the
interpreter's imports, the Spark session and its executors, the Python workers, the model's
download, shipping and one load per Python worker; it is measured with a warm-up of one small
slice per core. Steady state is the images/s of the rest, on the same session and workers.
Peak RSS sums resident memory over the way's whole process tree (and the cluster's daemons,
executors and Python workers for `standalone`), sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

STARTED = time.monotonic()  # before the heavy imports: they are part of the start-up

from bench.batch_scoring import TreeMemory  # noqa: E402 (after the clock starts)
from bench.common import RESULTS, ROOT, machine, process_tree, setup, table, tree_rss_mb  # noqa: E402
from web.serve import server_env  # noqa: E402

WORKDIR = RESULTS / "spark_scoring"
WAYS = {"local": "local engine", "local2": "Spark local[2]", "standalone": "Spark standalone, 2 workers x 1 core"}
WARM_UP_PER_CORE = 8  # images per core in the warm-up slice: enough to load the model and run it once


def images(count: int, size: int) -> Path:
    """A folder of `count`+ synthetic faces at size x size (steps.extract; made once, then reused)."""
    from steps.extract import extract

    folder = WORKDIR / f"images_{size}"
    per_class = -(-count // 3)
    if sum(1 for _ in folder.rglob("*.jpg")) < 3 * per_class:
        extract("synthetic", folder, WORKDIR / f"metadata_{size}.csv", images_per_class=per_class, seed=2026, synthetic_size=size)
    return folder


def one(way: str, folder: Path, count: int, model_uri: str, batch_size: int, master: str | None) -> dict:
    """In the child process: start-up, then steady-state scoring of the rest; the figures as a dict."""
    import mlflow

    from steps.score import Columns, list_inputs, score_local

    marks = {"imports": time.monotonic() - STARTED}
    entries = list_inputs(folder).entries[:count]
    columns = Columns.of(mlflow.models.get_model_info(model_uri).signature)
    if way == "local":
        import os

        cores = os.cpu_count() or 1
        model = mlflow.pyfunc.load_model(model_uri)
        marks["model loaded"] = time.monotonic() - STARTED
        warm, rest = entries[: WARM_UP_PER_CORE * cores], entries[WARM_UP_PER_CORE * cores :]
        list(score_local(model, warm, columns, WARM_UP_PER_CORE, {}))
        started_up = time.monotonic()
        rows = sum(len(batch) for batch in score_local(model, rest, columns, batch_size, {}))
    else:
        from steps.score_spark import score_spark, spark_session

        spark = spark_session(master)
        context = spark.sparkContext
        marks["session"] = time.monotonic() - STARTED
        if way == "standalone":  # the executors register after the session starts
            while context._jsc.sc().getExecutorMemoryStatus().size() - 1 < 2:
                time.sleep(0.2)
            marks["executors"] = time.monotonic() - STARTED
        cores = context.defaultParallelism
        warm, rest = entries[: WARM_UP_PER_CORE * cores], entries[WARM_UP_PER_CORE * cores :]
        list(score_spark(spark, model_uri, warm, columns, WARM_UP_PER_CORE))
        started_up = time.monotonic()
        rows = sum(len(batch) for batch in score_spark(spark, model_uri, rest, columns, batch_size))
    seconds = time.monotonic() - started_up
    marks["first images on every core"] = started_up - STARTED
    return {"startup": started_up - STARTED, "images": rows, "seconds": seconds, "cores": cores, "marks": marks}


def run(way: str, folder: Path, count: int, model_uri: str, tracking_uri: str, batch: int, master: str | None, also: list[int]) -> dict:
    """One way in its own process; its figures and the peak RSS of its tree (plus `also`'s trees)."""
    command = [sys.executable, "-m", "bench.spark_scoring", "--one", way, "--images", str(count), "--model-uri", model_uri]
    command += ["--batch-size", str(batch), "--folder", str(folder)] + (["--master", master] if master else [])
    process = subprocess.Popen(command, cwd=ROOT, env=server_env(MLFLOW_TRACKING_URI=tracking_uri), stdout=subprocess.PIPE, text=True)
    memory = TreeMemory(process.pid)
    cluster_memory = ClusterMemory(also)
    cpu = CpuByKind([process.pid, *also])
    stdout, _ = process.communicate()
    peak = memory.stop() + cluster_memory.stop()
    if process.returncode != 0:
        raise RuntimeError(f"{way} failed (exit code {process.returncode}):\n{stdout[-2000:]}")
    figures = json.loads(stdout.strip().splitlines()[-1])
    return {**figures, "way": way, "peak_mb": peak, "cpu": cpu.totals()}


class ClusterMemory(TreeMemory):
    """The peak of the summed RSS of several process trees (the cluster's daemons and their children)."""

    def __init__(self, pids: list[int], every: float = 0.2):
        self.pids = pids
        super().__init__(0, every)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, sum(tree_rss_mb(pid) for pid in self.pids))
            self._stop.wait(self.every)


class CpuByKind(TreeMemory):
    """CPU seconds (user + system) of the processes in some trees (the first root is the driver's
    Python), by kind: JVMs, Spark's Python workers, the driver (or the local engine's) Python. Each
    process's last sampled figure counts (a process that lived under 0.2 s may be missed)."""

    def __init__(self, pids: list[int], every: float = 0.2):
        self.pids, self.seen = pids, {}
        super().__init__(0, every)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in process_tree(self.pids):
                figures = _cpu(pid, driver=self.pids[0])
                if figures is not None:
                    self.seen[pid] = figures
            self._stop.wait(self.every)

    def totals(self) -> dict[str, float]:
        self.stop()
        totals: dict[str, float] = {}
        for kind, seconds in self.seen.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals


def _cpu(pid: int, driver: int) -> tuple[str, float] | None:
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    if b"java" in command.split(b"\0")[0]:
        kind = "JVMs"
    elif pid == driver:
        kind = "driver (or local engine) Python"
    else:  # every other Python process of the trees: Spark's daemon and Python workers
        kind = "Spark's Python workers"
    return kind, seconds


def _scored(figures: dict) -> int:
    """Images scored in the whole run: the warm-up's and the steady state's."""
    return figures["images"] + WARM_UP_PER_CORE * figures["cores"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--size", type=int, default=512, help="pixels per side (AFHQ: 512)")
    parser.add_argument("--model-uri", help="default: the project's Production model, else a quickly trained default CNN")
    parser.add_argument("--ways", default=",".join(WAYS), help="comma-separated, of: " + ", ".join(WAYS))
    parser.add_argument("--batch-size", type=int, default=256, help="images per model call and per Spark slice")
    parser.add_argument("--one", choices=WAYS, help=argparse.SUPPRESS)  # the child process
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.one:
        print(json.dumps(one(args.one, args.folder, args.images, args.model_uri, args.batch_size, args.master)), flush=True)
        return 0

    from steps import spark_cluster

    model = setup(args.model_uri, workdir=WORKDIR / "pipeline", images_per_class=60, epochs=2)
    folder = images(args.images, args.size)
    print(f"{args.images:,} JPEGs of {args.size}x{args.size} in {folder}; model {model.model_uri} ({model.origin})", flush=True)
    load_before = machine()
    results = []
    for way in args.ways.split(","):
        master, also, cluster_up = {"local": None, "local2": "local[2]"}.get(way), [], None
        state = WORKDIR / "cluster"
        if way == "standalone":
            started = time.monotonic()
            cluster = spark_cluster.start(state, workers=2, cores=1, memory="2g")
            cluster_up, master, also = time.monotonic() - started, cluster.master, list(cluster.pids.values())
        try:
            figures = run(way, folder, args.images, model.model_uri, model.tracking_uri, args.batch_size, master, also)
        finally:
            if way == "standalone":
                spark_cluster.stop(state)
        figures["cluster_up"] = cluster_up
        print(json.dumps(figures), flush=True)
        results.append(figures)
    local = next((r for r in results if r["way"] == "local"), None)
    table(
        f"Spark scoring, {args.images:,} {args.size}x{args.size} JPEGs, model {model.model_uri} ({machine()}; before: {load_before})",
        ["way", "cores", "start-up s", "images (steady)", "steady s", "images/s", "vs local", "peak RSS MB", "cluster up s"],
        [
            [
                WAYS[r["way"]],
                r["cores"],
                r["startup"],
                f"{r['images']:,}",
                r["seconds"],
                r["images"] / r["seconds"],
                f"{(r['images'] / r['seconds']) / (local['images'] / local['seconds']):.0%}" if local else "",
                r["peak_mb"],
                "" if r["cluster_up"] is None else f"{r['cluster_up']:.1f}",
            ]
            for r in results
        ],
    )
    table(
        "Where the time goes: start-up marks (s from the process's start) and CPU seconds per 1,000 images over the whole run",
        ["way", "start-up marks", "CPU s / 1,000 images, by process"],
        [
            [
                WAYS[r["way"]],
                ", ".join(f"{name} {seconds:.1f}" for name, seconds in r["marks"].items()),
                ", ".join(f"{kind} {1000 * seconds / _scored(r):.2f}" for kind, seconds in r["cpu"].items()),
            ]
            for r in results
        ],
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
