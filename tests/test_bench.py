"""Smoke tests: each benchmark runs end to end on tiny sizes and prints its table. No timing is
asserted (DESIGN.md: bench/ measures, tests do not); the figures are in the README."""

from __future__ import annotations

import pytest

from tests.conftest import SHARED_SAMPLE


@pytest.fixture()
def model_args(pipeline) -> list[str]:
    return ["--model-uri", "models:/animal/Production", "--db", str(pipeline.db)]


def test_serving_both_ways_over_http(model_args, tmp_path, capsys):
    from bench import serving

    plot = tmp_path / "latency.png"
    assert (
        serving.main(
            [*model_args, "--requests", "6", "--levels", "1,2", "--batches", "2", "--batch-size", "4", "--warmup", "2", "--plot", str(plot)]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| 2 | baseline |" in out and "One request of 4 images" in out and "targets:" in out
    assert plot.stat().st_size > 0


def test_training_both_ways(pipeline, tmp_path, capsys):
    from bench import training
    from steps.train import Hyperparameters, build_model

    plot = tmp_path / "training.png"
    assert training.main(["--db", str(pipeline.db), "--epochs", "2", "--image-size", "32", "--filters", "4", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    for row in ("| images only | tutorial |", "| training epoch | ours |", "later CPU s", "peak RSS MB"):
        assert row in out
    # Both sides train the network asked for, not the default one.
    narrow = build_model(Hyperparameters(filters=4), 32, 3).count_params()
    assert f"ours {narrow:,} parameters, tutorial {narrow:,} parameters" in out
    assert plot.stat().st_size > 0


def test_recommender_speed_and_quality(model_args, capsys):
    from bench import recommender

    assert recommender.main([*model_args, "--sizes", "300,2000", "--queries", "20", "--naive-queries", "3"]) == 0
    out = capsys.readouterr().out
    assert "| 2,000 | ours |" in out and "| 2,000 | naive" in out
    assert "| as served (gallery of the predicted label) |" in out and "same fur_color" in out


def test_accuracy_report(model_args, capsys):
    from bench import accuracy

    assert accuracy.main(model_args) == 0
    out = capsys.readouterr().out
    assert "Validation split" in out and "| cat |" in out
    assert ("Real AFHQ photos" in out) == SHARED_SAMPLE.is_dir()


def test_onnx_runtime_and_tensorflow_side_by_side(pipeline, model_args, capsys):
    from bench import onnx_runtime

    # A real 512 px photo when the shared sample is there; any catalogue image does for a smoke test.
    photos = sorted(SHARED_SAMPLE.rglob("*.jpg")) if SHARED_SAMPLE.is_dir() else []
    photo = photos[0] if photos else next(pipeline.image_store.rglob("*.jpg"))
    assert onnx_runtime.main([*model_args[:2], "--photo", str(photo), "--requests", "4", "--levels", "1,2", "--score", ""]) == 0
    out = capsys.readouterr().out
    assert "| ONNX Runtime |" in out and "| TensorFlow (Keras path) |" in out
