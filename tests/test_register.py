"""The promotion gate, end to end, with models whose accuracy is known exactly.

The validation split is made unbalanced (2 cats, 1 dog, 1 wild), so a model that always says
"cat" scores 0.5 and one that always says "dog" scores 0.25: no luck involved."""
from __future__ import annotations

import csv

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from steps.populate import populate
from steps.register import register
from tests.conftest import run_pipeline


@pytest.fixture(scope="module")
def unbalanced_db(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    image_store, metadata, _ = run_pipeline(root, seed=11)
    with metadata.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    kept, seen = [], {"cat": 0, "dog": 0, "wild": 0}
    for row in rows:
        if row["split"] == "val":
            seen[row["label"]] += 1
            if seen[row["label"]] > (2 if row["label"] == "cat" else 1):
                continue
        kept.append(row)
    with metadata.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    db = root / "unbalanced.db"
    populate(metadata, image_store, db)
    return db


def constant_model(label: str, db) -> str:
    """Log a real `animal` pyfunc whose classifier always answers `label`; returns its model URI."""
    from steps.train import Hyperparameters, build_model, load_data, log_training

    data = load_data(db, image_size=16)
    model = build_model(Hyperparameters(conv_blocks=1, filters=4, dense_units=4), 16, len(data.labels))
    kernel, bias = model.layers[-1].get_weights()
    bias = np.full_like(bias, -10.0)
    bias[data.labels.index(label)] = 10.0
    model.layers[-1].set_weights([np.zeros_like(kernel), bias])
    with mlflow.start_run():
        _, model_uri = log_training(model, data, history=None, image_size=16)
    return model_uri


def test_gate_promotes_only_a_model_at_least_as_good(unbalanced_db, monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'registry.db'}")
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'registry.db'}")
    mlflow.set_experiment("gate")
    client = MlflowClient()
    try:
        always_cat, always_dog, cat_again = (constant_model(label, unbalanced_db) for label in ("cat", "dog", "cat"))

        first = register(always_cat, unbalanced_db)
        assert first.promoted and first.accuracy == 0.5 and first.production_accuracy is None

        worse = register(always_dog, unbalanced_db)
        assert not worse.promoted and worse.accuracy == 0.25 and worse.production_accuracy == 0.5
        assert "below Production version 1" in worse.reason
        assert str(client.get_model_version_by_alias("animal", "production").version) == first.version
        assert client.get_model_version("animal", first.version).current_stage == "Production"
        assert client.get_model_version("animal", worse.version).current_stage == "None"
        assert "not promoted" in client.get_model_version("animal", worse.version).tags["promotion"]

        again = register(always_dog, unbalanced_db)  # re-running registers nothing new
        assert again.version == worse.version and not again.promoted

        tie = register(cat_again, unbalanced_db)  # as good: promoted, the old one archived
        assert tie.promoted and tie.version == "3"
        assert str(client.get_model_version_by_alias("animal", "production").version) == "3"
        assert client.get_model_version("animal", first.version).current_stage == "Archived"
        assert [str(v.version) for v in client.get_latest_versions("animal", stages=["Production"])] == ["3"]
    finally:
        mlflow.set_tracking_uri(None)
        monkeypatch.undo()
        mlflow.set_tracking_uri(__import__("os").environ["MLFLOW_TRACKING_URI"])
        mlflow.set_experiment("tests")
