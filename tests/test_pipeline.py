"""The whole `main` entry point, as `mlflow run . --env-manager local` runs it, on tiny data."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from dataclasses import asdict

import mlflow
import pytest
from mlflow import MlflowClient

from steps.defaults import Hyperparameters
from tests.conftest import ROOT, SHARED_SAMPLE, TINY, VENV_PATH


def mlflow_run(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlflow", "run", str(ROOT), "--env-manager", "local", *args],
        cwd=cwd,
        env={**os.environ, "PATH": VENV_PATH},
        capture_output=True,
        text=True,
        timeout=900,
    )


def params(**values) -> list[str]:
    return [arg for name, value in values.items() for arg in ("-P", f"{name}={value}")]


def test_main_runs_every_step_and_promotes(tmp_path):
    result = mlflow_run(*params(data_dir=tmp_path / "data", db=tmp_path / "animal.db", **TINY))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout[result.stdout.index("=== summary ===") :]
    assert "validation acc." in summary and "model             animal version" in summary
    assert "mlflow models serve -m models:/animal@production" in summary

    client = MlflowClient()
    runs = client.search_runs(
        [mlflow.get_experiment_by_name("tests").experiment_id], order_by=["attributes.start_time DESC"], max_results=50
    )
    parent = next(r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "main")
    nested = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    children = {r.data.tags["mlflow.project.entryPoint"]: r for r in nested if "mlflow.project.entryPoint" in r.data.tags}
    assert set(children) == {"extract", "populate", "train"}
    # register's evaluation (mlflow.models.evaluate) is a child run too, named after the version it scored.
    assert any(r.info.run_name.startswith("evaluate models:/animal/") for r in nested)
    # Each run is named after what ran, not a generated name.
    assert parent.info.run_name == "main"
    assert all(run.info.run_name == entry_point for entry_point, run in children.items())
    assert all(r.info.status == "FINISHED" for r in children.values())
    train = children["train"]
    # `mlflow run` fills what it is not given from the MLproject: the network must be the code's default.
    for name, value in asdict(Hyperparameters()).items():
        assert train.data.params[name] == value if isinstance(value, str) else float(train.data.params[name]) == float(value), name
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "final_val_accuracy"} <= set(train.data.metrics)
    assert len(client.get_metric_history(train.info.run_id, "val_accuracy")) == TINY["epochs"]
    artifacts = {a.path for a in client.list_artifacts(train.info.run_id)}
    assert {"training_curves.png", "confusion_matrix.png", "classification_report.txt"} <= artifacts
    assert train.inputs.dataset_inputs[0].dataset.name == "catalogue"
    with sqlite3.connect(tmp_path / "animal.db") as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 3 * TINY["images_per_class"]
    version = parent.data.tags["model_version"]
    assert client.get_model_version("animal", version).tags["catalogue_sha256"] == train.data.tags["catalogue_sha256"]

    # Running it again is safe: the store and catalogue are unchanged, and the gate decides.
    again = mlflow_run(*params(data_dir=tmp_path / "data", db=tmp_path / "animal.db", **TINY))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "0 written" in again.stdout and "0 inserted, 0 updated, 36 unchanged" in again.stdout
    with sqlite3.connect(tmp_path / "animal.db") as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 3 * TINY["images_per_class"]
    production = client.get_model_version_by_alias("animal", "production")
    assert (
        float(production.tags["val_accuracy"])
        >= max(
            float(client.get_model_version("animal", v.version).tags["val_accuracy"])
            for v in client.search_model_versions("name = 'animal'")
            if "val_accuracy" in v.tags and v.tags.get("catalogue_sha256") == production.tags["catalogue_sha256"]
        )
        - 1e-9
    )


def test_a_bad_source_fails_with_one_clear_line(tmp_path):
    result = mlflow_run("-e", "extract", *params(source=tmp_path / "nowhere", image_store=tmp_path / "i", metadata=tmp_path / "m.csv"))
    assert result.returncode != 0
    assert "extract: error: source not found" in result.stderr


@pytest.mark.skipif(not SHARED_SAMPLE.is_dir(), reason="../shared/data/afhq-sample is not present")
def test_real_sample_through_extract_populate_and_train(tmp_path):
    from steps.extract import extract
    from steps.populate import populate
    from steps.train import train

    extract(str(SHARED_SAMPLE), tmp_path / "images", tmp_path / "meta.csv")
    report = populate(tmp_path / "meta.csv", tmp_path / "images", tmp_path / "db")
    assert report.inserted == 57
    _, accuracy, model_uri = train(tmp_path / "db", image_size=32, epochs=1)
    out = mlflow.pyfunc.load_model(model_uri).predict(
        __import__("pandas").DataFrame({"image": [next(SHARED_SAMPLE.glob("val/dog/*.jpg")).read_bytes()]})
    )
    assert out.label[0] in ("cat", "dog", "wild") and out.error[0] is None and 0 <= accuracy <= 1
