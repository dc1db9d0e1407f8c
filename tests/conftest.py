"""Shared fixtures: an isolated MLflow store for every test session, a tiny pipeline run on generated
data (once per session), and a real `mlflow models serve` of its Production model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest

from web.serve import free_port  # noqa: F401  (the tests take it from here)

ROOT = Path(__file__).resolve().parents[1]
SHARED_SAMPLE = ROOT.parent / "shared" / "data" / "afhq-sample"
# The scoring server starts `uvicorn` by name: the venv's bin folder must be on PATH.
VENV_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
TINY = {"images_per_class": 12, "image_size": 32, "epochs": 2}


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory) -> str:
    """Every test session writes to its own MLflow database and artifact folder, never to ./mlflow.db
    or ./mlruns. The environment variables reach the runs that `mlflow run` starts too."""
    folder = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("tests", artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment("tests")  # also sets MLFLOW_EXPERIMENT_ID, which `mlflow run` children inherit
    return uri


@dataclass(frozen=True)
class Pipeline:
    root: Path
    image_store: Path
    metadata: Path
    db: Path
    tracking_uri: str
    run_id: str
    model_uri: str
    version: str


def run_pipeline(root: Path, seed: int = 7, **overrides) -> tuple[Path, Path, Path]:
    """extract + populate a tiny synthetic data set under root; returns (image store, CSV, db)."""
    from steps.extract import extract
    from steps.populate import populate

    settings = {**TINY, **overrides}
    image_store, metadata, db = root / "images", root / "metadata.csv", root / "catalogue.db"
    extract("synthetic", image_store, metadata, images_per_class=settings["images_per_class"], seed=seed)
    populate(metadata, image_store, db)
    return image_store, metadata, db


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory, tracking_store) -> Pipeline:
    """A tiny end-to-end run: extract, populate, train (2 epochs, 32 px), register and promote."""
    from steps.register import register
    from steps.train import train

    root = tmp_path_factory.mktemp("pipeline")
    image_store, metadata, db = run_pipeline(root)
    run_id, _, model_uri = train(db, image_size=TINY["image_size"], epochs=TINY["epochs"])
    promotion = register(model_uri, db)
    return Pipeline(root, image_store, metadata, db, tracking_store, run_id, model_uri, promotion.version)


@pytest.fixture(scope="session")
def scoring_server(pipeline, tmp_path_factory) -> str:
    """`mlflow models serve` of models:/animal/Production; yields its base URL."""
    from web.serve import scoring_server as serve

    log = tmp_path_factory.mktemp("serve") / "serve.log"
    with serve("models:/animal/Production", wait=180, tracking_uri=pipeline.tracking_uri, log=log) as served:
        yield served.url


def run_distributed_tune(command: list[str], env: dict, cwd: Path, logs_dir: Path, state_file: Path, timeout: float) -> None:
    """KerasTuner's distributed mode on loopback: the chief first (it writes `state_file` once it
    serves the oracle), then two workers; fails with the last lines of the log of any that fails."""
    logs, processes = {}, {}

    def start(tuner_id: str) -> None:
        logs[tuner_id] = (logs_dir / f"{tuner_id}.log").open("w")
        processes[tuner_id] = subprocess.Popen(
            command, cwd=cwd, env={**env, "KERASTUNER_TUNER_ID": tuner_id}, stdout=logs[tuner_id], stderr=subprocess.STDOUT
        )

    start("chief")
    try:
        deadline = time.monotonic() + timeout
        while not state_file.exists() and processes["chief"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        start("tuner0")
        start("tuner1")
        for name, process in processes.items():
            assert process.wait(timeout=timeout) == 0, (logs_dir / f"{name}.log").read_text()[-3000:]
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
        for log in logs.values():
            log.close()
