"""Pretrained backbones, never the network: a weights file made here (the backbone randomly
initialised and saved) goes the whole way: loaded, trained (head, then fine-tuned), logged,
registered, served through the pyfunc. Offline, weights=imagenet stops with one line."""

from __future__ import annotations

import keras
import keras_tuner as kt
import mlflow
import pandas as pd
import pytest

from steps import backbones, train
from steps.defaults import Hyperparameters
from tests.conftest import run_pipeline

SIZE = 32  # the smallest input keras.applications accepts without a top


@pytest.fixture(scope="module")
def tiny_db(tmp_path_factory):
    _, _, db = run_pipeline(tmp_path_factory.mktemp("backbone"), seed=5, images_per_class=8)
    return db


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """MobileNetV3Small without its top, randomly initialised, saved as a user's own weights file."""
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v3_small.weights.h5"
    backbones.build("mobilenet_v3_small", "none", SIZE).save_weights(path)
    return path


def offline(monkeypatch, tmp_path):
    """An empty Keras cache and a download that fails as it does without internet."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))

    def no_network(backbone, cache, top=False):
        raise Exception(f"URL fetch failure on {backbone.origin}: None -- [Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(backbones, "download", no_network)


def test_weights_imagenet_offline_stops_with_one_line(tiny_db, monkeypatch, tmp_path, capsys):
    offline(monkeypatch, tmp_path)
    code = train.main(["--db", str(tiny_db), "--image-size", str(SIZE), "--backbone", "mobilenet_v3_small", "--weights", "imagenet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("train: error: weights=imagenet for mobilenet_v3_small")
    assert f"put that file (from {backbones.BACKBONES['mobilenet_v3_small'].origin}) into {tmp_path / 'keras' / 'models'}/" in err
    assert "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5" in err
    assert "weights=<path" in err


def test_the_cached_file_is_the_one_keras_looks_for(monkeypatch, tmp_path):
    """With the file in Keras' cache no download is tried: the names above are the right ones."""
    offline(monkeypatch, tmp_path)
    assert backbones.keras_cache() == tmp_path / "keras" / "models"
    with pytest.raises(backbones.WeightsUnavailable, match="efficientnetb0_notop.h5"):
        backbones.weights_file("efficientnet_b0", "imagenet")
    monkeypatch.setattr(backbones, "download", lambda backbone, cache, top=False: str(cache / backbone.file))
    assert backbones.weights_file("efficientnet_b0", "imagenet") == str(tmp_path / "keras" / "models" / "efficientnetb0_notop.h5")


def test_bad_backbone_or_missing_weights_file_are_one_line_errors(tiny_db, tmp_path, capsys):
    code = train.main(["--db", str(tiny_db), "--backbone", "mobilenet_v3_small", "--weights", str(tmp_path / "nope.h5")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "weights file not found" in err
    with pytest.raises(SystemExit):
        train.build_parser().parse_args(["--backbone", "resnet"])


def test_efficientnet_b0_builds_with_its_own_scaling_inside():
    model = train.build_model(Hyperparameters(backbone="efficientnet_b0", weights="none", dense_units=8), SIZE, 3)
    kinds = {type(layer) for layer in model.get_layer("efficientnetb0").layers}
    assert {keras.layers.Rescaling, keras.layers.Normalization} <= kinds  # pixels in 0..255, as for the CNN
    assert model.output_shape == (None, 3) and train.familiarity_layers(model) == [train.FEATURES_LAYER]
    assert not model.get_layer("efficientnetb0").trainable  # the head is trained first


def test_tune_keeps_the_backbone_it_was_given():
    from steps.tune import hyperparameters

    network = Hyperparameters(backbone="mobilenet_v3_small", weights="none", fine_tune_epochs=2)
    chosen = hyperparameters(kt.HyperParameters(), network)
    assert (chosen.backbone, chosen.weights, chosen.fine_tune_epochs) == ("mobilenet_v3_small", "none", 2)


def test_pretrained_path_end_to_end(tiny_db, weights_file, tmp_path):
    from steps.register import register

    hp = Hyperparameters(backbone="mobilenet_v3_small", weights=str(weights_file), fine_tune_epochs=1, dense_units=8)
    run_id, accuracy, model_uri = train.train(tiny_db, image_size=SIZE, epochs=1, hp=hp)
    run = mlflow.MlflowClient().get_run(run_id)
    assert run.data.params["backbone"] == "mobilenet_v3_small" and run.data.params["weights"] == str(weights_file)
    assert len(mlflow.MlflowClient().get_metric_history(run_id, "val_accuracy")) == 2  # head, then fine-tuning
    facts = mlflow.artifacts.load_dict(f"runs:/{run_id}/model_card.json")
    assert facts["hyperparameters"]["backbone"] == "mobilenet_v3_small"
    assert any("mobilenet_v3_small backbone was pretrained" in limit for limit in facts["limits"])

    local = mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path))
    loaded = keras.models.load_model(f"{local}/artifacts/classifier.keras", compile=False)
    assert loaded.get_layer("MobileNetV3Small").trainable  # fine-tuned: saved unfrozen

    promotion = register(model_uri, tiny_db, name="animal-backbone")
    files = list(tiny_db.parent.glob("images/val/*/*.jpg"))[:3]
    out = mlflow.pyfunc.load_model(f"models:/animal-backbone/{promotion.version}").predict(
        pd.DataFrame({"image": [f.read_bytes() for f in files]})
    )
    assert out.error.isna().all() and out.label.isin(["cat", "dog", "wild"]).all()
    assert out.unfamiliar.map(lambda v: isinstance(v, bool)).all() and out.familiarity.between(0, 1).all()
    assert 0 <= accuracy <= 1
