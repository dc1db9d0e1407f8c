"""tune: a tiny search (tiny data, 32 px, 1 epoch a trial) with one injected failure and one
interruption, resumed; and KerasTuner's distributed mode, a chief and two workers on 127.0.0.1."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import keras_tuner as kt
import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from steps import train
from steps.tune import STATE_FILE, SearchMismatch, hyperparameters, tune
from tests.conftest import ROOT, free_port, run_distributed_tune, run_pipeline

TINY = {"tuner": "random", "max_trials": 2, "epochs": 1, "image_size": 32}


@pytest.fixture(scope="module")
def store(tmp_path_factory, tracking_store):
    """A tracking store (and registry) of this module's own: the gate here never meets other tests' models."""
    folder, experiment = tmp_path_factory.mktemp("tune-mlflow"), os.environ.get("MLFLOW_EXPERIMENT_ID")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    os.environ["MLFLOW_TRACKING_URI"] = uri
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("tune", artifact_location=(folder / "artifacts").as_uri())
    mlflow.set_experiment("tune")  # and MLFLOW_EXPERIMENT_ID, which the distributed test's processes inherit
    yield uri
    os.environ["MLFLOW_TRACKING_URI"] = tracking_store
    mlflow.set_tracking_uri(tracking_store)
    if experiment:
        mlflow.set_experiment(experiment_id=experiment)


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> Path:
    return run_pipeline(tmp_path_factory.mktemp("tune-data"), seed=11, images_per_class=12)[2]


def trial_runs(parent_id: str) -> pd.DataFrame:
    experiment = MlflowClient().get_run(parent_id).info.experiment_id
    runs = mlflow.search_runs(
        [experiment], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'", order_by=["attributes.start_time ASC"]
    )
    return runs.dropna(subset=["tags.trial_id"])


def test_search_space_holds_train_defaults():
    assert hyperparameters(kt.HyperParameters()) == train.Hyperparameters()


def test_trials_are_child_runs_a_failure_is_recorded_and_a_resumed_search_repeats_nothing(store, db, tmp_path, monkeypatch):
    directory = tmp_path / "tuning"
    settings = {**TINY, "directory": directory}
    real_fit, calls, mishaps = train.fit, [], iter(["fail", "interrupt"])

    def flaky_fit(*args, **kwargs):
        calls.append(1)
        mishap = next(mishaps, None)
        if mishap == "fail":
            raise ValueError("injected failure")
        if mishap == "interrupt":
            raise KeyboardInterrupt  # as if the person pressed Ctrl-C during trial 2
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(train, "fit", flaky_fit)
    with pytest.raises(KeyboardInterrupt):
        tune(db, **settings)
    state = json.loads((directory / "random" / STATE_FILE).read_text())
    parent_id = state["parent_run_id"]
    assert MlflowClient().get_run(parent_id).info.status == "KILLED"

    calls.clear()
    result = tune(db, **settings)  # same arguments: resumes
    assert len(calls) == 1, "only the interrupted trial runs again"
    assert result.run_id == parent_id, "the same parent run"

    runs = trial_runs(parent_id)
    assert sorted(zip(runs["tags.trial_id"], runs.status)) == [("0", "FAILED"), ("1", "FINISHED"), ("1", "KILLED")]
    failed = runs[runs.status == "FAILED"].iloc[0]
    assert "injected failure" in failed["tags.error"]
    assert "injected failure" in mlflow.artifacts.load_text(f"runs:/{failed.run_id}/error.txt")
    done = runs[runs.status == "FINISHED"].iloc[0]
    assert {f"params.{name}" for name in ("conv_blocks", "filters", "dense_units", "dropout", "learning_rate", "augment")} <= set(
        runs.columns
    )
    assert done["metrics.final_val_accuracy"] == pytest.approx(result.best_val_accuracy)
    assert len(MlflowClient().get_metric_history(done.run_id, "val_accuracy")) == 1  # per epoch

    parent = MlflowClient().get_run(parent_id)
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in MlflowClient().list_artifacts(parent_id)}
    assert {"trials.csv", "trials.png", "best_hyperparameters.json", "confusion_matrix.png"} <= artifacts
    table = pd.read_csv(mlflow.artifacts.download_artifacts(f"runs:/{parent_id}/trials.csv"))
    assert sorted(table.status) == ["COMPLETED", "FAILED"]
    version = MlflowClient().get_model_version("animal", result.promotion.version)
    assert version.run_id == parent_id and "promotion" in version.tags

    calls.clear()
    again = tune(db, **settings)  # a finished search: nothing to train, nothing new to register
    assert calls == [] and again.run_id == parent_id and again.promotion.version == result.promotion.version

    with pytest.raises(SearchMismatch, match="epochs=1"):
        tune(db, **{**settings, "epochs": 2})


def test_distributed_chief_and_two_workers_on_loopback(store, db, tmp_path):
    """DISTRIBUTED, about a minute: three processes, KerasTuner's chief oracle and two workers over
    gRPC on 127.0.0.1; every worker's trials land as child runs of the chief's one parent run."""
    directory = tmp_path / "tuning"
    command = [
        sys.executable,
        "-m",
        "steps.tune",
        "--db",
        str(db),
        "--max-trials",
        "4",
        "--epochs",
        "1",
        "--image-size",
        "32",
        "--tuner",
        "random",
        "--directory",
        str(directory),
    ]
    env = {
        **os.environ,
        "KERASTUNER_ORACLE_IP": "127.0.0.1",
        "KERASTUNER_ORACLE_PORT": str(free_port()),
        "MLFLOW_TRACKING_URI": store,
        "PYTHONUNBUFFERED": "1",
    }
    state_file = directory / "random" / STATE_FILE
    run_distributed_tune(command, env, cwd=ROOT, logs_dir=tmp_path, state_file=state_file, timeout=300)

    parent_id = json.loads(state_file.read_text())["parent_run_id"]
    runs = trial_runs(parent_id)
    assert sorted(runs["tags.trial_id"]) == ["0", "1", "2", "3"] and set(runs.status) == {"FINISHED"}
    assert set(runs["tags.tuner_id"]) <= {"tuner0", "tuner1"}
    print("trials per worker:", runs["tags.tuner_id"].value_counts().to_dict())
    version = MlflowClient().search_model_versions(f"name = 'animal' AND run_id = '{parent_id}'")
    assert version and "promotion" in version[0].tags
