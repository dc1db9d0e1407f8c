"""The served network on ONNX Runtime vs TensorFlow, side by side: the same logged model, run one
way then the other (ANIMAL_RUNTIME=keras makes the pyfunc take its Keras path, as models logged
before the ONNX graph do).

    python -m bench.onnx_runtime [--model-uri URI] [--mobilenet-v2] [--requests 200] [--score 1000,4000]
    python -m bench.onnx_runtime --real-photos [--sizes 224,160] [--runtimes onnx]

For each model and runtime: `mlflow models serve` (one worker) started from nothing, timed until it
answers /ping; one real 512 px photo (the shared AFHQ sample) in every request, p50 at concurrency
1 and requests/s at 1, 4 and 16; the worker's resident memory (the largest process of the server's
tree) once it has answered them all; then `score` (local engine) images/s on bench/batch_scoring's
512 px JPEGs. Models: the default CNN (bench/common.py's setup), and with --mobilenet-v2 Keras'
MobileNetV2 at 224 px with the shared ImageNet weights under our head (built here, not trained:
the arithmetic is the same), logged by train.log_training.

--real-photos measures the real-photo model itself, beside the default CNN: MobileNetV2 with
head=imagenet and epochs=0 (the shared ImageNet weights with their top), registered from the
57-photo AFHQ sample's catalogue the way the pipeline does it (bench/real_photos.py), at each of
--sizes; and `score` runs on the 1,500 real AFHQ cats (../shared/data/afhq-cats) for every model,
instead of the synthetic JPEGs, with the share it flags unfamiliar.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.batch_scoring import Measured, distinct_copies, photos, run_score
from bench.common import AFHQ_SAMPLE, RESULTS, SHARED, _rss_kb, machine, percentiles, setup, table, tree_rss_mb
from bench.serving import run_load
from pyfunc.model import RUNTIME_VARIABLE
from web.serve import start_scoring_server

WORKDIR = RESULTS / "onnx_runtime"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet_no_top.weights.h5"
RUNTIMES = ("onnx", "keras")


def tree(root: int) -> dict[int, list[int]]:
    """pid -> its children, for `root` and every process under it."""
    children = {
        root: [int(pid) for pid in subprocess.run(["ps", "-o", "pid=", "--ppid", str(root)], capture_output=True, text=True).stdout.split()]
    }
    for child in children[root]:
        children.update(tree(child))
    return children


def worker_mb(root: int) -> float:
    """Resident memory of the largest process without children under `root`: the server's worker,
    which holds the model (the `mlflow models serve` process above it is nearly as large)."""
    return max(_rss_kb(pid) / 1024 for pid, below in tree(root).items() if not below)


def cpu_seconds(root: int) -> float:
    """User + system CPU time of `root` and the processes under it, all threads: what the
    requests cost whatever the machine's load (other work stretches the wall clock, not this)."""
    total = 0
    for pid in tree(root):
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def mobilenet_v2_model(tracking_uri: str) -> str:
    """MobileNetV2 (ImageNet weights, 224 px) under our head, logged as the `animal` pyfunc; made once."""
    remembered = WORKDIR / "mobilenet_v2.json"
    if remembered.is_file() and json.loads(remembered.read_text())["tracking_uri"] == tracking_uri:
        return json.loads(remembered.read_text())["model_uri"]
    import keras
    import mlflow

    from bench.common import _synthetic_catalogue
    from steps import train
    from steps.defaults import Hyperparameters

    db = _synthetic_catalogue(WORKDIR / "mobilenet_catalogue", images_per_class=40)  # log_training's forward passes: seconds
    data = train.load_data(db, 224)
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False, input_shape=(224, 224, 3))
    backbone.load_weights(str(WEIGHTS))
    inputs = keras.Input((224, 224, 3))
    scaled = keras.layers.Rescaling(1 / 127.5, offset=-1)(inputs)  # mobilenet_v2.preprocess_input, inside the model
    features = keras.layers.GlobalAveragePooling2D(name=train.FEATURES_LAYER)(backbone(scaled, training=False))
    hp = Hyperparameters()
    model = keras.Model(inputs, train.head(features, hp, len(data.labels)), name="animal_mobilenet_v2")
    bench_experiment()
    with mlflow.start_run(run_name="bench mobilenet_v2 224"):
        _, model_uri = train.log_training(model, data, None, 224, hp)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    remembered.write_text(json.dumps({"tracking_uri": tracking_uri, "model_uri": model_uri}))
    return model_uri


def bench_experiment() -> None:
    """Runs go to the store's "bench" experiment, never its Default (whose artifacts land in ./mlruns)."""
    import mlflow

    if mlflow.get_experiment_by_name("bench") is None:
        mlflow.create_experiment("bench", artifact_location=(WORKDIR / "artifacts").as_uri())
    mlflow.set_experiment("bench")


def real_photo_models(sizes: list[int]) -> dict[str, str]:
    """The real-photo model (head=imagenet, epochs=0) at each size, from the AFHQ sample's catalogue."""
    from bench.real_photos import WEIGHTS as TOP_WEIGHTS
    from bench.real_photos import pretrained_model, sample_catalogue

    workdir = WORKDIR / "real_photos"  # its own models.json: these runs live in this bench's store
    workdir.mkdir(parents=True, exist_ok=True)
    bench_experiment()
    db = sample_catalogue(workdir)
    return {f"MobileNetV2 head=imagenet, epochs=0 ({size} px)": pretrained_model(db, TOP_WEIGHTS, 0, workdir, size) for size in sizes}


def serving(model_uri: str, tracking_uri: str, runtime: str, body: bytes, levels: list[int], requests: int) -> list:
    """One row: start-up s, p50/p95 ms and the server's CPU ms per request at the first level,
    requests/s per level, worker and tree MB."""
    os.environ[RUNTIME_VARIABLE] = runtime
    started = time.monotonic()
    server = start_scoring_server(model_uri, tracking_uri=tracking_uri, log=WORKDIR / f"serve_{runtime}.log")
    try:
        server.wait()
        start_up = time.monotonic() - started
        run_load(server.url, [body], 2, 20)  # first calls: caches, and the Keras path's first trace
        cpu = cpu_seconds(server.process.pid)
        loads = {levels[0]: run_load(server.url, [body], levels[0], requests)}
        cpu_ms = (cpu_seconds(server.process.pid) - cpu) * 1000 / requests
        loads.update({level: run_load(server.url, [body], level, requests) for level in levels[1:]})
        worker, whole = worker_mb(server.process.pid), tree_rss_mb(server.process.pid)
    finally:
        server.stop()
        del os.environ[RUNTIME_VARIABLE]
    first = percentiles(loads[levels[0]].latencies_ms)
    errors = sum(load.errors for load in loads.values())
    return [start_up, first["p50"], first["p95"], cpu_ms, *(loads[level].throughput for level in levels), worker, whole, errors]


def score_cell(measured: Measured, cats: bool = False) -> str:
    """images/s (files, peak MB[, share called cat, where every file is a cat][, share flagged unfamiliar])."""
    called = f", {measured.labels.get('cat', 0) / measured.images:.1%} cat" if cats and measured.labels is not None else ""
    flagged = "" if measured.unfamiliar is None else f", {measured.unfamiliar / measured.images:.1%} unfamiliar"
    return f"{measured.per_second:,.0f} ({measured.images:,} files, {measured.peak_mb:,.0f} MB{called}{flagged})"


def scoring(model_uri: str, tracking_uri: str, runtime: str, counts: list[int], base: list[Path], folder: Path | None = None) -> list[str]:
    """`score` images/s (and peak MB of its process tree) for each count of distinct 512 px files, or
    for the files of `folder` (given: the counts are not run)."""
    os.environ[RUNTIME_VARIABLE] = runtime
    try:
        if folder is not None:
            return [score_cell(run_score(f"{runtime} {folder.name}", folder, model_uri, tracking_uri), cats=True)]
        cells = []
        for count in counts:
            folder = WORKDIR / f"score_{count}"
            copies = -(-count // len(base))
            distinct_copies(base, folder, copies)  # `count` files or a few more: base x copies
            measured = run_score(f"{runtime} {count}", folder, model_uri, tracking_uri)
            cells.append(score_cell(measured))
        return cells
    finally:
        del os.environ[RUNTIME_VARIABLE]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="the CNN to measure (default: bench/common.py's setup)")
    parser.add_argument("--epochs", type=int, default=3, help="if a CNN has to be trained first (speed does not depend on it)")
    parser.add_argument("--mobilenet-v2", action="store_true", help="also MobileNetV2 at 224 px (needs ../shared/weights)")
    parser.add_argument("--photo", type=Path, help="the photo in every request (default: the first of the shared AFHQ sample)")
    parser.add_argument("--requests", type=int, default=200, help="requests per concurrency level")
    parser.add_argument("--levels", default="1,4,16")
    parser.add_argument("--score", default="1000,4000", help="file counts for `score` (CNN); empty: none")
    parser.add_argument("--no-cnn", action="store_true", help="MobileNetV2 only (with --mobilenet-v2)")
    parser.add_argument("--score-mobilenet", default="1000", help="file counts for `score` with MobileNetV2")
    parser.add_argument("--real-photos", action="store_true", help="the real-photo model at --sizes; `score` on the real AFHQ cats")
    parser.add_argument("--sizes", default="224,160", help="image sizes of the real-photo model (with --real-photos)")
    parser.add_argument("--runtimes", default=",".join(RUNTIMES), help="runtimes to measure, of: " + ", ".join(RUNTIMES))
    args = parser.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    runtimes = [r for r in args.runtimes.split(",") if r]
    if set(runtimes) - set(RUNTIMES):
        parser.error(f"--runtimes: of {', '.join(RUNTIMES)}")
    from bench.real_photos import CATS
    from bench.real_photos import WEIGHTS as TOP_WEIGHTS

    if args.real_photos and not (TOP_WEIGHTS.is_file() and CATS.is_dir() and AFHQ_SAMPLE.is_dir()):
        print(f"--real-photos needs {TOP_WEIGHTS}, {CATS} and {AFHQ_SAMPLE}", file=sys.stderr)
        return 2
    cats = CATS if args.real_photos else None
    photo = args.photo or next(iter(sorted(AFHQ_SAMPLE.rglob("*.jpg"))), None)
    if photo is None:
        print(f"no photo: pass --photo, or put the AFHQ sample at {AFHQ_SAMPLE}", file=sys.stderr)
        return 2
    WORKDIR.mkdir(parents=True, exist_ok=True)
    cnn = setup(args.model_uri, epochs=args.epochs)
    os.environ["MLFLOW_TRACKING_URI"] = cnn.tracking_uri
    models = {} if args.no_cnn else {"default CNN (64 px)": (cnn.model_uri, [int(x) for x in args.score.split(",") if x])}
    if args.mobilenet_v2:
        models["MobileNetV2 (224 px)"] = (mobilenet_v2_model(cnn.tracking_uri), [int(x) for x in args.score_mobilenet.split(",") if x])
    if args.real_photos:
        models.update({name: (uri, []) for name, uri in real_photo_models([int(x) for x in args.sizes.split(",")]).items()})
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo.read_bytes()).decode("ascii")]]}})
    # bench/batch_scoring's 512 px JPEGs (made once); `score` runs on distinct copies of them.
    wanted = cats is None and any(c for _, c in models.values())
    base = photos(WORKDIR.parent / "batch_scoring" / "images_512", 1000, 512) if wanted else []
    before = machine()
    print(f"machine: {before}\nphoto: {photo.name} ({photo.stat().st_size / 1024:.0f} KB)", flush=True)

    serve_rows, score_rows = [], []
    for name, (uri, counts) in models.items():
        for runtime in runtimes:
            label = "ONNX Runtime" if runtime == "onnx" else "TensorFlow (Keras path)"
            serve_rows.append([name, label, *serving(uri, cnn.tracking_uri, runtime, body.encode(), levels, args.requests)])
            print(serve_rows[-1], flush=True)
            if counts or cats is not None:
                score_rows.append([name, label, *scoring(uri, cnn.tracking_uri, runtime, counts, base, cats)])
                print(score_rows[-1], flush=True)
    after = machine()
    table(
        f"Scoring server, one 512 px photo per request, one worker ({before}; after: {after.rsplit('load average', 1)[1]})",
        ["model", "runtime", "start-up s", "p50 ms (c=1)", "p95 ms (c=1)", "server CPU ms per request (c=1)"]
        + [f"requests/s c={level}" for level in levels]
        + ["worker MB", "server tree MB", "errors"],
        serve_rows,
    )
    if score_rows and cats is not None:
        table(
            f"`score`, local engine, the {len(list(cats.glob('*/*.jpg'))):,} real AFHQ cats (512 px JPEGs)",
            ["model", "runtime", "images/s (files, peak MB, called cat, flagged unfamiliar)"],
            score_rows,
        )
    elif score_rows:
        counts = max((models[name][1] for name in models), key=len)
        rows = [row + ["not run"] * (2 + len(counts) - len(row)) for row in score_rows]
        headers = ["model", "runtime", *(f"{c:,} files" for c in counts)]
        table("`score`, local engine, 512 px JPEGs: images/s (files, peak MB)", headers, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
