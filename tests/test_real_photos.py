"""The real-photo model: MobileNetV2 whose head starts as ImageNet's own cats, dogs and wild animals.

Without ../shared (as in CI) the whole path runs on a weights file made here: a randomly initialised
MobileNetV2 with its top, saved as a user's file would be, at 96 px to keep it quick. With the shared
ImageNet weights and the real AFHQ sample there, the zero-shot accuracy on the sample is checked too.
"""

from __future__ import annotations

import io
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest

from databases import catalogue
from pyfunc.preprocess import load_image
from steps import backbones, features, imagenet_groups, train
from steps.defaults import Hyperparameters
from tests.conftest import ROOT, SHARED_SAMPLE, run_pipeline
from tests.outputs import TOLERANCE, close

SIZE = 96
SHARED_WEIGHTS = ROOT.parent / "shared" / "weights" / "mobilenet_v2_1.0_224_imagenet.weights.h5"
LABELS = ["cat", "dog", "wild"]


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    _, _, db = run_pipeline(tmp_path_factory.mktemp("real-photos"), seed=11, images_per_class=6)
    return db


@pytest.fixture(scope="module")
def top_weights(tmp_path_factory):
    """A random MobileNetV2 with ImageNet's 1000-way top, saved with save_weights."""
    keras.utils.set_random_seed(3)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_top.weights.h5"
    keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=True, weights=None).save_weights(path)
    return path


@pytest.fixture()
def feature_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ANIMAL_FEATURE_CACHE", str(tmp_path / "features"))
    return tmp_path / "features"


def hp_for(weights, **changes) -> Hyperparameters:
    return Hyperparameters(backbone="mobilenet_v2", weights=str(weights), head="imagenet", **changes)


def catalogue_files(db, split: str) -> pd.DataFrame:
    conn = catalogue.connect(db, readonly=True)
    try:
        return catalogue.images(conn, split=split)
    finally:
        conn.close()


def test_the_imagenet_groups_by_name_and_index():
    names = imagenet_groups.NAMES
    assert set(names) == set(range(151, 300))
    assert (names[151], names[268], names[273], names[299]) == ("Chihuahua", "Mexican hairless", "dingo", "meerkat")
    assert [names[i] for i in imagenet_groups.CAT] == ["tabby", "tiger cat", "Persian cat", "Siamese cat", "Egyptian cat"]
    assert {"timber wolf", "hyena", "red fox", "lion", "ice bear", "mongoose"} <= {names[i] for i in imagenet_groups.WILD}
    assert names[273] not in {names[i] for i in imagenet_groups.WILD}
    cat, dog, wild = (set(imagenet_groups.GROUPS[label]) for label in LABELS)
    assert (len(cat), len(dog), len(wild)) == (5, 119, 25)
    assert not (cat & dog or cat & wild or dog & wild) and cat | dog | wild == set(names)
    matrix = imagenet_groups.group_matrix(["wild", "cat", "dog"])  # any label order: columns follow it
    assert matrix.sum(axis=1).max() == 1 and matrix[281, 1] == matrix[273, 2] == matrix[276, 0] == 1
    with pytest.raises(ValueError, match="cat, dog and wild"):
        imagenet_groups.group_matrix(["cat", "horse"])


def test_head_imagenet_is_imagenet_pooled_over_the_groups(top_weights):
    model = train.build_model(hp_for(top_weights), SIZE, 3, LABELS)
    reference = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=True, weights=None)
    reference.load_weights(top_weights)
    images = np.random.default_rng(0).integers(0, 256, (4, SIZE, SIZE, 3)).astype(np.float32)
    imagenet = np.asarray(reference(keras.applications.mobilenet_v2.preprocess_input(images.copy()), training=False))
    grouped = imagenet @ imagenet_groups.group_matrix(LABELS)
    probabilities, mass = (np.asarray(out) for out in model(images, training=False))
    assert probabilities.tolist() == [[close(v) for v in row] for row in grouped / grouped.sum(axis=1, keepdims=True)]
    assert mass[:, 0].tolist() == [close(v) for v in grouped.sum(axis=1)]
    assert train.familiarity_layers(model) == [train.ANIMAL_MASS_LAYER]
    assert not model.get_layer("mobilenetv2_1.00_96").trainable  # frozen until fine-tuning


def test_head_imagenet_needs_the_top(tiny_db, tmp_path):
    no_top = tmp_path / "no_top.weights.h5"
    backbones.build("mobilenet_v2", "none", SIZE).save_weights(no_top)
    with pytest.raises(backbones.WeightsUnavailable, match="has no ImageNet classifier"):
        train.build_model(hp_for(no_top), SIZE, 3, LABELS)
    code = train.main(["--db", str(tiny_db), "--backbone", "cnn", "--head", "imagenet"])
    assert code == 2


def test_epochs_0_registers_the_imagenet_head_as_built_and_serves_it(tiny_db, top_weights, feature_cache, tmp_path):
    from steps.register import register
    from steps.score import score

    hp = hp_for(top_weights)
    run_id, accuracy, model_uri = train.train(tiny_db, image_size=SIZE, epochs=0, hp=hp)
    client = mlflow.MlflowClient()
    assert client.get_metric_history(run_id, "val_accuracy") == []  # nothing trained
    facts = mlflow.artifacts.load_dict(f"runs:/{run_id}/model_card.json")
    assert facts["hyperparameters"]["head"] == "imagenet" and "animal_mass" in facts["familiarity"]["method"]
    assert "Chosen over the Mahalanobis distance" in mlflow.artifacts.load_text(f"runs:/{run_id}/model_card.md")

    promotion = register(model_uri, tiny_db, name="animal-imagenet")
    model = mlflow.pyfunc.load_model(f"models:/animal-imagenet/{promotion.version}")
    val = catalogue_files(tiny_db, "val")
    out = model.predict(pd.DataFrame({"image": [Path(f).read_bytes() for f in val.file]}), params={"k": 3})
    assert out.error.isna().all() and out.label.isin(LABELS).all()
    assert float((out.label == val.label.to_numpy()).mean()) == close(accuracy)
    # The stored threshold flags at most MASS_FLAG_SHARE of validation, by its calibration.
    assert out.unfamiliar.astype(bool).mean() <= train.MASS_FLAG_SHARE + 1e-9
    # An uploaded catalogue image is never its own similar image.
    for own_id, similar in zip(val.id, out.similar):
        assert similar and own_id not in [item["id"] for item in similar]

    # Batch scoring of the same images, through the same registered model.
    folder = tmp_path / "to-score"
    folder.mkdir()
    for i, f in enumerate(val.file[:4]):
        (folder / f"{i}.jpg").write_bytes(Path(f).read_bytes())
    result = score(folder, tmp_path / "scored.csv", f"models:/animal-imagenet/{promotion.version}", batch_size=2, interactive=False)
    assert result.summary.errors == 0 and sum(result.summary.labels.values()) == len(val.file[:4])


def test_head_epochs_run_on_cached_features_and_a_rerun_hits(tiny_db, top_weights, feature_cache):
    hp = hp_for(top_weights, fine_tune_epochs=1)
    first, _, _ = train.train(tiny_db, image_size=SIZE, epochs=2, hp=hp)
    images = len(catalogue_files(tiny_db, None))
    metrics = mlflow.MlflowClient().get_run(first).data.metrics
    assert (metrics["feature_cache_hits"], metrics["feature_cache_misses"]) == (0, images)
    assert len(list(feature_cache.rglob("*.npy"))) == images
    # head epochs (2) then fine-tuning (1), each logged
    assert len(mlflow.MlflowClient().get_metric_history(first, "val_accuracy")) == 3
    second, _, _ = train.train(tiny_db, image_size=SIZE, epochs=2, hp=hp_for(top_weights))
    metrics = mlflow.MlflowClient().get_run(second).data.metrics
    assert (metrics["feature_cache_hits"], metrics["feature_cache_misses"]) == (images, 0)


def test_tune_searches_the_head_on_cached_features(tiny_db, top_weights, feature_cache, tmp_path):
    """KerasTuner's checkpoints hold the whole network, though the head trains on features."""
    from steps.tune import tune

    result = tune(
        tiny_db, 2, 2, "random", SIZE, 1, True, tmp_path / "search", model_name="animal-imagenet-tune", network=hp_for(top_weights)
    )
    assert len(result.trials) == 2 and result.best.head == "imagenet" and 0 <= result.best_val_accuracy <= 1
    assert len(list(feature_cache.rglob("*.npy"))) == len(catalogue_files(tiny_db, None))  # computed once for both trials


def test_cached_features_are_the_backbones_own(top_weights, feature_cache):
    import tensorflow as tf

    model = train.build_model(hp_for(top_weights), SIZE, 3, LABELS)
    images = np.random.default_rng(1).integers(0, 256, (3, SIZE, SIZE, 3)).astype(np.uint8)
    dataset = tf.data.Dataset.from_tensor_slices(images)
    (computed,) = features.pooled_features(model, train.FEATURES_LAYER, [dataset])
    (read,) = features.pooled_features(model, train.FEATURES_LAYER, [dataset])
    assert features.last_counts == {"hits": 3, "misses": 0}
    direct = np.asarray(keras.Model(model.inputs, model.get_layer(train.FEATURES_LAYER).output)(images, training=False))
    assert np.abs(computed - direct).max() <= TOLERANCE and np.array_equal(computed, read)


def test_the_page_answers_with_this_model(tiny_db, top_weights, feature_cache, tmp_path, tracking_store):
    from steps.register import register
    from web.app import create_app
    from web.serve import scoring_server

    _, _, model_uri = train.train(tiny_db, image_size=SIZE, epochs=0, hp=hp_for(top_weights))
    promotion = register(model_uri, tiny_db, name="animal-imagenet-page")
    val = catalogue_files(tiny_db, "val")
    photo = Path(val.file.iloc[0]).read_bytes()
    with scoring_server(
        f"models:/animal-imagenet-page/{promotion.version}", wait=180, tracking_uri=tracking_store, log=tmp_path / "serve.log"
    ) as served:
        settings = {"SCORING_URL": f"{served.url}/invocations", "ANIMAL_DB": str(tiny_db), "IMAGE_STORE": str(tiny_db.parent / "images")}
        client = create_app(settings).test_client()
        response = client.post("/api/predict", data={"image": (io.BytesIO(photo), "face.jpg")}, content_type="multipart/form-data")
        page = client.post("/predict", data={"image": (io.BytesIO(photo), "face.jpg")}, content_type="multipart/form-data")
    row = response.json
    assert response.status_code == 200 and row["label"] in LABELS and row["error"] is None
    assert row["similar"] and int(val.id.iloc[0]) not in [item["id"] for item in row["similar"]]
    assert page.status_code == 200 and f"data-label>{row['label']}</h1>" in page.get_data(as_text=True)
    assert client.get(f"/images/{row['similar'][0]['id']}").status_code == 200  # a similar image of its own catalogue


@pytest.mark.skipif(not (SHARED_WEIGHTS.is_file() and SHARED_SAMPLE.is_dir()), reason="no shared ImageNet weights or AFHQ sample")
def test_zero_shot_on_the_real_sample():
    """The shared ImageNet weights, no training: at least 0.9 of the 57 real AFHQ photos right."""
    files = sorted(SHARED_SAMPLE.glob("*/*/*.jpg"))
    model = train.build_model(hp_for(SHARED_WEIGHTS), 224, 3, LABELS)
    images = np.stack([load_image(f.read_bytes(), 224) for f in files])
    probabilities = np.concatenate([np.asarray(model(images[i : i + 16], training=False)[0]) for i in range(0, len(images), 16)])
    truth = [f.parent.name for f in files]
    right = np.mean([LABELS[p] == t for p, t in zip(probabilities.argmax(axis=1), truth)])
    assert len(files) == 57 and right >= 0.9
