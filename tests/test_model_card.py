"""The model card of a registered version: its facts are the run's metrics, it is the version's
description and artifact, and the page shows it (footer, GET /api/model)."""

from __future__ import annotations

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from databases import catalogue
from steps import model_card
from web.app import create_app
from web.model_info import ModelInfo


@pytest.fixture(scope="module")
def card(pipeline) -> dict:
    facts, problem = ModelInfo(pipeline.tracking_uri).facts()  # the way the page reads it
    assert problem is None
    return facts


def test_card_facts_are_the_runs_metrics(pipeline, card):
    client = MlflowClient()
    run = client.get_run(pipeline.run_id)
    metrics, params = run.data.metrics, run.data.params
    assert card["model"] == {"name": "animal", "version": pipeline.version, "run_id": pipeline.run_id}
    validation = card["validation"]
    assert validation["accuracy"] == pytest.approx(metrics["final_val_accuracy"])
    assert float(client.get_model_version("animal", pipeline.version).tags["val_accuracy"]) == pytest.approx(
        validation["accuracy"], abs=5e-5
    )
    labels = validation["confusion_matrix"]["labels"]
    assert labels == ["cat", "dog", "wild"]
    for label in labels:
        assert validation["accuracy_per_class"][label] == pytest.approx(metrics[f"val_accuracy_{label}"])
    rows = validation["confusion_matrix"]["rows"]
    assert sum(map(sum, rows)) == validation["images"] == int(params["val_images"])
    assert sum(rows[i][i] for i in range(3)) / validation["images"] == pytest.approx(validation["accuracy"])
    assert card["familiarity"]["threshold"] == pytest.approx(metrics["familiarity_threshold"])
    assert card["familiarity"]["val_unfamiliar_share"] == pytest.approx(metrics["val_unfamiliar_share"])
    assert {k: str(v) for k, v in card["hyperparameters"].items()} == {k: params[k] for k in card["hyperparameters"]}


def test_card_facts_are_the_catalogues(pipeline, card):
    conn = catalogue.connect(pipeline.db, readonly=True)
    try:
        frame, content_hash = catalogue.images(conn), catalogue.content_hash(conn)
    finally:
        conn.close()
    data = card["data"]
    assert data["catalogue_sha256"] == content_hash == MlflowClient().get_run(pipeline.run_id).data.tags["catalogue_sha256"]
    assert data["image_size"] == 32 and data["source"] == "synthetic" and data["synthetic"]
    counts = frame.groupby(["split", "label"]).size()
    assert data["images"] == {split: {label: int(counts[split, label]) for label in ("cat", "dog", "wild")} for split in ("train", "val")}
    assert any("not for real photos" in limit for limit in card["limits"])


def test_the_version_carries_the_card(pipeline, card):
    client = MlflowClient()
    version = client.get_model_version("animal", pipeline.version)
    assert version.description == model_card.render(card)
    assert "not for real photos" in version.description and f"version {pipeline.version}" in version.description
    model_id = model_card.logged_model_id(version)
    files = {f.path for f in client.list_logged_model_artifacts(model_id)}
    assert {"model_card.md", "model_card.json", "MLmodel"} <= files


def test_the_evaluation_is_mlflows_with_roc_and_calibration(pipeline, card):
    runs = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.evaluated_model = 'models:/animal/{pipeline.version}'")
    assert not runs.empty
    run = MlflowClient().get_run(runs.run_id.iloc[0])
    assert run.data.metrics["accuracy_score"] == pytest.approx(card["validation"]["accuracy"])
    assert {"precision_score", "recall_score", "f1_score"} <= set(run.data.metrics)
    artifacts = {a.path for a in MlflowClient().list_artifacts(run.info.run_id)}
    assert {"per_class_metrics.csv", "confusion_matrix.png", "roc_and_calibration_plot.png"} <= artifacts


def test_api_model_and_the_footer(pipeline, card, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", pipeline.tracking_uri)
    client = create_app({"ANIMAL_DB": str(pipeline.db)}).test_client()
    response = client.get("/api/model")
    assert response.status_code == 200 and response.json == card
    page = client.get("/").get_data(as_text=True)  # the card is cached by now
    footer = page[page.index("data-model-footer") :]
    assert f"version <span data-model-version>{pipeline.version}</span>" in footer
    assert "trained on <span data-model-source>synthetic</span> drawings" in footer
    assert f"{card['validation']['accuracy'] * 100:.1f}%" in footer


def test_without_a_registry_the_page_still_works(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'none.db'}")
    client = create_app().test_client()
    response = client.get("/api/model")
    assert response.status_code == 503 and "model card is not available" in response.json["error"]
    assert "model <code>animal</code> (Production)" in client.get("/").get_data(as_text=True)
    assert not (tmp_path / "none.db").exists()


def photo_card_facts(backbone: str) -> dict:
    """The facts of a card for a tiny catalogue of photos (3 per split) with a pretrained `backbone`."""
    frame = pd.DataFrame({"split": ["train", "val"] * 3, "label": ["cat", "cat", "dog", "dog", "wild", "wild"], "source": ["afhq"] * 6})
    return model_card.training_facts(
        frame,
        ["cat", "dog", "wild"],
        "0" * 64,
        224,
        0.9,
        {"cat": 1.0, "dog": 1.0, "wild": 0.7},
        [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
        12.5,
        0.05,
        0.05,
        {"backbone": backbone, "weights": "imagenet"},
    )


def test_a_model_trained_on_photos_does_not_say_it_is_not_for_photos():
    facts = photo_card_facts("efficientnet_b0")
    text = model_card.render(facts)
    assert "not for real photos" not in text and "afhq" in text
    assert "efficientnet_b0 backbone was pretrained (weights: imagenet)" in text
    assert "small" in text  # 3 validation images: the accuracy is a rough figure
