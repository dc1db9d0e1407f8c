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
    mlflow.create_experiment("gate", artifact_location=(tmp_path / "artifacts").as_uri())
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
        # Both sides of that decision were measured by mlflow.models.evaluate, each in a run of its own.
        evaluated = mlflow.search_runs(filter_string="tags.evaluated_model LIKE 'models:/animal/%'")
        assert set(evaluated["tags.evaluated_model"]) == {"models:/animal/1", "models:/animal/2"}
        assert set(evaluated["metrics.accuracy_score"]) == {0.5, 0.25}

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


@pytest.fixture
def own_registry(monkeypatch, tmp_path):
    """A registry of this test's own, so that version numbers are known."""
    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.create_experiment("rollback", artifact_location=(tmp_path / "artifacts").as_uri())
    mlflow.set_experiment("rollback")
    yield MlflowClient()
    mlflow.set_tracking_uri(None)
    monkeypatch.undo()
    mlflow.set_tracking_uri(__import__("os").environ["MLFLOW_TRACKING_URI"])
    mlflow.set_experiment("tests")


def test_rollback_forced_then_restored_and_the_tags_tell_the_story(unbalanced_db, own_registry):
    from steps.register import promote

    client = own_registry
    better = register(constant_model("cat", unbalanced_db), unbalanced_db)  # 0.5, version 1
    worse = register(constant_model("dog", unbalanced_db), unbalanced_db)  # 0.25, version 2, held back
    assert (better.version, worse.version) == ("1", "2") and not worse.promoted

    refused = promote("2", unbalanced_db)  # not forced: the gate still says no, and nothing changes
    assert not refused.promoted and "below Production version 1" in refused.reason
    assert str(client.get_model_version_by_alias("animal", "production").version) == "1"

    forced = promote("2", unbalanced_db, force=True)
    assert forced.promoted and forced.reason.startswith("forced: 0.2500 < Production version 1's 0.5000")
    assert str(client.get_model_version_by_alias("animal", "production").version) == "2"
    assert client.get_model_version("animal", "2").current_stage == "Production"
    assert client.get_model_version("animal", "1").current_stage == "Archived"
    v1, v2 = client.get_model_version("animal", "1").tags, client.get_model_version("animal", "2").tags
    assert v2["replaced"] == "1" and v1["replaced_by"] == "2" and v2["promoted_at"] == v1["replaced_at"]

    restored = promote("1", unbalanced_db)  # the better one back, through the gate
    assert restored.promoted and restored.reason == "promoted: 0.5000 >= Production version 2's 0.2500"
    assert str(client.get_model_version_by_alias("animal", "production").version) == "1"
    assert [str(v.version) for v in client.get_latest_versions("animal", stages=["Production"])] == ["1"]
    v1, v2 = client.get_model_version("animal", "1").tags, client.get_model_version("animal", "2").tags
    assert v1["replaced"] == "2" and v2["replaced_by"] == "1" and v1["promotion"] == restored.reason

    history = client.get_registered_model("animal").tags["production_history"].splitlines()
    assert [line.split(" ", 1)[1].split(":", 1)[0] for line in history] == [
        "version 1 replaced none",
        "version 2 replaced 1",
        "version 1 replaced 2",
    ]
    assert "forced" in history[1]


def test_promote_cli_says_in_one_line_what_is_wrong(unbalanced_db, own_registry, capsys):
    from steps.promote import main

    assert main(["--version", "1", "--db", str(unbalanced_db)]) == 2
    assert capsys.readouterr().err.strip() == "promote: error: there is no registered model named 'animal'"
    register(constant_model("cat", unbalanced_db), unbalanced_db)
    capsys.readouterr()
    assert main(["--version", "7", "--db", str(unbalanced_db)]) == 2
    assert capsys.readouterr().err.strip() == "promote: error: animal has no version '7' (versions: 1)"
    assert main(["--version", "1", "--name", "it's", "--db", str(unbalanced_db)]) == 2
    assert capsys.readouterr().err.strip() == 'promote: error: there is no registered model named "it\'s"'
    assert main(["--version", "1", "--db", str(unbalanced_db)]) == 0
    assert "already Production" in capsys.readouterr().out


def test_the_gate_is_mlflows_validation_at_the_production_accuracy():
    from mlflow.models import EvaluationResult

    from steps.register import Evaluation, at_least_as_good

    def scored(accuracy: float) -> Evaluation:
        return Evaluation(accuracy, {}, {}, 4, EvaluationResult({"accuracy_score": accuracy}, {}), "run")

    assert at_least_as_good(scored(0.5), scored(0.5))  # a tie is good enough
    assert at_least_as_good(scored(0.75), scored(0.5))
    assert not at_least_as_good(scored(0.25), scored(0.5))
    assert at_least_as_good(scored(0.0), scored(0.0))
