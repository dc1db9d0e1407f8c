"""Every entry point logs to the `animal-faces` experiment unless told otherwise (issue 19): a plain
`mlflow run . -e NAME --env-manager local` lands there, not in MLflow's Default (steps/tracking.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import ViewType

from steps.tracking import MOVED_TAG
from tests.conftest import VENV_PATH

ROOT = Path(__file__).resolve().parents[1]


def mlflow_run(tmp_path: Path, *args: str, **env: str) -> MlflowClient:
    """`mlflow run` of a tiny extract against a store of its own, with no experiment in the
    environment (as in a user's shell); returns a client on that store."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    clean = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")}
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", "extract", "--env-manager", "local", *args]
    command += ["-P", f"image_store={tmp_path / 'images'}", "-P", f"metadata={tmp_path / 'metadata.csv'}", "-P", "images_per_class=2"]
    env = {**clean, "PATH": VENV_PATH, "MLFLOW_TRACKING_URI": uri, **env}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return MlflowClient(tracking_uri=uri)


def runs(client: MlflowClient, name: str, view: int = ViewType.ACTIVE_ONLY) -> list:
    experiment = client.get_experiment_by_name(name)
    return [] if experiment is None else client.search_runs([experiment.experiment_id], run_view_type=view)


def test_mlflow_run_without_an_experiment_lands_in_animal_faces(tmp_path):
    client = mlflow_run(tmp_path)
    (run,) = runs(client, "animal-faces")
    assert run.info.run_name == "extract" and run.info.status == "FINISHED"
    assert run.data.params["images_per_class"] == "2" and run.data.metrics["written"] == 6
    assert run.data.tags["mlflow.project.entryPoint"] == "extract"
    (made,) = runs(client, "Default")  # the run `mlflow run` made there: empty, pointing here
    assert made.data.tags[MOVED_TAG] == run.info.run_id and made.info.status == "FINISHED" and not made.data.metrics


@pytest.mark.parametrize("how", ["--experiment-name", "MLFLOW_EXPERIMENT_NAME"])
def test_a_named_experiment_wins(tmp_path, how):
    if how == "--experiment-name":
        client = mlflow_run(tmp_path, "--experiment-name", "mine")
    else:
        client = mlflow_run(tmp_path, MLFLOW_EXPERIMENT_NAME="mine")
    (run,) = runs(client, "mine")
    assert run.info.run_name == "extract" and run.info.status == "FINISHED"
    assert runs(client, "animal-faces") == [] and runs(client, "Default", ViewType.ALL) == []
