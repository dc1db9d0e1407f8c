"""What every benchmark shares: the model to measure, the machine it ran on, tables (servers are
started by web.serve, the one helper for that).

The model is, in order of preference: a model URI given on the command line; `models:/animal/Production`
of the project's own `./mlflow.db` with its catalogue `databases/animal.db` (what `make run` makes);
or a small pipeline run of our own in a work folder with its own SQLite tracking store (reused by
later runs, so only the first one pays for training).
"""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from steps import defaults

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"  # git-ignored: plots and the benchmarks' own pipeline run
# The real photos and ImageNet weights beside the checkout when present, as the tests read them;
# never copied into the repository. Benchmarks that use them take another folder as a flag.
SHARED = ROOT.parent / "shared"
AFHQ_SAMPLE = SHARED / "data" / "afhq-sample"  # 57 real AFHQ photos (CC BY-NC 4.0)
MODEL_NAME, STAGE = "animal", "Production"


@dataclass(frozen=True)
class Setup:
    """A served model and the catalogue it was trained on."""

    tracking_uri: str
    model_uri: str
    db: Path
    origin: str  # where it came from, for the report


def machine() -> str:
    """CPU model, cores and load, as the README's figures quote them."""
    model = platform.processor() or "unknown CPU"
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        pass
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{model}, {os.cpu_count()} cores, load average {load}"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def process_tree(roots: list[int]) -> list[int]:
    """The processes `roots` and all their descendants (server workers, executors), by pid."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces and parentheses
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_rss_mb(root: int) -> float:
    """Resident memory (VmRSS) of process `root` and all its descendants (server workers), in MB."""
    return sum(_rss_kb(pid) for pid in process_tree([root])) / 1024


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into the README)."""
    cells = [[_cell(v) for v in row] for row in rows]
    lines = [f"\n### {title}\n", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}" if abs(value) >= 10 else f"{value:.2f}"
    return str(value)


def percentiles(samples_ms: Sequence[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(np.asarray(samples_ms), [50, 95, 99])
    return {"p50": float(p50), "p95": float(p95), "p99": float(p99)}


def setup(
    model_uri: str | None = None,
    workdir: Path = RESULTS / "pipeline",
    images_per_class: int = defaults.IMAGES_PER_CLASS,
    image_size: int = defaults.IMAGE_SIZE,
    epochs: int = defaults.EPOCHS,
    db: Path | None = None,
) -> Setup:
    """The model to measure (see the module docstring); sets MLflow's tracking URI to its store."""
    import mlflow

    if model_uri:
        uri = os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{ROOT / 'mlflow.db'}")
        mlflow.set_tracking_uri(uri)
        return Setup(uri, model_uri, Path(db or ROOT / "databases" / "animal.db"), "given")
    project = _registered(ROOT / "mlflow.db", ROOT / "databases" / "animal.db")
    if project:
        return project
    return _registered(workdir / "mlflow.db", workdir / "catalogue.db") or _make(workdir, images_per_class, image_size, epochs)


def _registered(store: Path, db: Path) -> Setup | None:
    """models:/animal/Production of this store, if the store, the model and the catalogue exist.
    The file is checked first: opening a missing SQLite store would create an empty one."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not (store.is_file() and db.is_file()):
        return None
    uri = f"sqlite:///{store}"
    try:
        with warnings.catch_warnings():  # stages are deprecated, yet `models:/animal/Production` is what we serve
            warnings.simplefilter("ignore", FutureWarning)
            if not MlflowClient(uri).get_latest_versions(MODEL_NAME, stages=[STAGE]):
                return None
    except MlflowException:
        return None
    mlflow.set_tracking_uri(uri)
    return Setup(uri, f"models:/{MODEL_NAME}/{STAGE}", db, str(store))


def catalogue_db(workdir: Path = RESULTS / "pipeline", images_per_class: int = defaults.IMAGES_PER_CLASS) -> Path:
    """The project's catalogue if `make run` made one, else synthetic data extracted into workdir."""
    project = ROOT / "databases" / "animal.db"
    return project if project.is_file() else _synthetic_catalogue(workdir, images_per_class)


def _synthetic_catalogue(workdir: Path, images_per_class: int) -> Path:
    """extract + populate the synthetic default into workdir (both steps skip what is there already)."""
    from steps.extract import extract
    from steps.populate import populate

    images, metadata, db = workdir / "images", workdir / "metadata.csv", workdir / "catalogue.db"
    if not db.is_file():
        print(f"extracting {images_per_class} synthetic images per class into {workdir}", flush=True)
        workdir.mkdir(parents=True, exist_ok=True)
        extract("synthetic", images, metadata, images_per_class=images_per_class)
        populate(metadata, images, db)
    return db


def _make(workdir: Path, images_per_class: int, image_size: int, epochs: int) -> Setup:
    """extract -> populate -> train -> register, in-process, into workdir's own store."""
    import mlflow

    from steps.register import register
    from steps.train import train

    print(
        f"no registered model found: training one in {workdir} ({images_per_class} images per class, "
        f"up to {epochs} epochs; later runs reuse it)",
        flush=True,
    )
    db = _synthetic_catalogue(workdir, images_per_class)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name("bench") is None:
        mlflow.create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    mlflow.set_experiment("bench")
    _, _, logged = train(db, image_size=image_size, epochs=epochs)
    register(logged, db)
    return Setup(uri, f"models:/{MODEL_NAME}/{STAGE}", db, f"{workdir} (trained now)")


def catalogue_rows(db: Path, split: str | None = None):
    """The catalogue's rows (pandas), with absolute file paths in `file`."""
    from databases import catalogue

    conn = catalogue.connect(db, readonly=True)
    try:
        return catalogue.images(conn, split=split)
    finally:
        conn.close()
