"""The served network on ONNX Runtime: checked against Keras when logged, the same rows as Keras
through every output path, and no TensorFlow where the model is served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import requests

from pyfunc import onnx_export
from pyfunc.model import RUNTIME_VARIABLE
from tests.conftest import ROOT, SHARED_SAMPLE, VENV_PATH
from tests.outputs import TOLERANCE, assert_same_label, assert_same_neighbours, close

URI = "models:/animal/Production"

# Run in a fresh interpreter: importing tensorflow, keras or tf2onnx fails there, as it would where
# they are not installed; it loads the served model, answers the images and scores them with `score`.
WITHOUT_TENSORFLOW = """
import importlib.abc, json, sys

class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "keras", "tf_keras", "tf2onnx"):
            raise ImportError(f"{name} is not installed here")
        return None

sys.meta_path.insert(0, Refuse())
import mlflow
import pandas as pd
from steps import score

files = json.loads(sys.argv[1])
model = mlflow.pyfunc.load_model(sys.argv[2])
rows = model.predict(pd.DataFrame({"image": [open(f, "rb").read() for f in files]}))
code = score.main(["--input", sys.argv[3], "--output", sys.argv[4], "--model-uri", sys.argv[2]])
loaded = sorted(name for name in sys.modules if name.split(".")[0] in ("tensorflow", "keras", "tf2onnx"))
runtime = model.unwrap_python_model().runtime
print(json.dumps({"rows": json.loads(rows.to_json(orient="records")), "score": code, "loaded": loaded, "runtime": runtime}))
"""


@pytest.fixture(scope="module")
def files(pipeline) -> list[Path]:
    """Validation images of the catalogue, and real 512 px photos when the shared sample is there."""
    found = sorted(pipeline.image_store.glob("val/*/*.jpg"))[:6]
    return found + (sorted(SHARED_SAMPLE.rglob("*.jpg"))[:3] if SHARED_SAMPLE.is_dir() else [])


@pytest.fixture(scope="module")
def keras_rows(pipeline, files) -> list[dict]:
    """What the same model answers through its Keras path (as a model logged before ONNX does)."""
    os.environ[RUNTIME_VARIABLE] = "keras"
    try:
        model = mlflow.pyfunc.load_model(URI)
    finally:
        del os.environ[RUNTIME_VARIABLE]
    assert model.unwrap_python_model().runtime.startswith("tensorflow")
    return answer(model, files)


def answer(model, files: list[Path]) -> list[dict]:
    frame = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}))
    return json.loads(frame.to_json(orient="records"))


def assert_same_row(row: dict, expected: dict) -> None:
    """The same answer within the float32 tolerance (neighbours: as many as `expected` has; the
    page asks for more)."""
    assert row["error"] is None and expected["error"] is None, (row["error"], expected["error"])
    assert_same_label(row["label"], expected["label"], expected["probabilities"])
    assert row["probabilities"] == {label: close(p) for label, p in expected["probabilities"].items()}
    assert row["confidence"] == close(expected["confidence"])
    assert row["familiarity"] == close(expected["familiarity"])
    if abs(expected["familiarity"] - 0.05) > TOLERANCE:  # the flag share: a tie may fall either way
        assert row["unfamiliar"] == expected["unfamiliar"]
    assert_same_neighbours([item["id"] for item in row["similar"]][: len(expected["similar"])], expected["similar"])


def test_the_model_carries_a_checked_onnx_graph_and_inference_requirements(pipeline):
    local = Path(mlflow.artifacts.download_artifacts(URI))
    config = json.loads((local / "artifacts" / "config.json").read_text())
    assert (local / "artifacts" / "network.onnx").is_file() and (local / "artifacts" / "classifier.keras").is_file()
    # Every output of the network: probabilities, the embedding, one per familiarity tap.
    assert len(config["onnx"]["outputs"]) == 2 + len(config["familiarity"]["layers"])
    assert config["onnx"]["checked_difference"] <= onnx_export.TOLERANCE
    requirements = (local / "requirements.txt").read_text()
    assert "onnxruntime==" in requirements and "pillow==" in requirements
    assert "tensorflow" not in requirements and "keras" not in requirements


def test_onnx_and_keras_give_the_same_rows(pipeline, files, keras_rows):
    model = mlflow.pyfunc.load_model(URI)
    assert model.unwrap_python_model().runtime.startswith("onnxruntime")
    for row, expected in zip(answer(model, files), keras_rows, strict=True):
        assert_same_row(row, expected)


def test_the_scoring_server_and_the_page_answer_as_keras(pipeline, scoring_server, files, keras_rows):
    import base64
    import io

    from web.app import create_app

    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(f.read_bytes()).decode()] for f in files]}}
    served = requests.post(f"{scoring_server}/invocations", json=body, timeout=60).json()["predictions"]
    client = create_app(
        {"SCORING_URL": f"{scoring_server}/invocations", "ANIMAL_DB": str(pipeline.db), "IMAGE_STORE": str(pipeline.image_store)}
    ).test_client()
    for path, row, expected in zip(files, served, keras_rows, strict=True):
        assert_same_row(row, expected)
        page = client.post("/api/predict", data={"image": (io.BytesIO(path.read_bytes()), "face.jpg")}, content_type="multipart/form-data")
        assert page.status_code == 200
        assert_same_row(page.json, expected)


def test_served_and_scored_in_a_process_that_cannot_import_tensorflow(pipeline, files, keras_rows, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(files):
        (folder / f"{i:02d}.jpg").write_bytes(path.read_bytes())
    output = tmp_path / "scores.parquet"
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_TENSORFLOW, json.dumps([str(f) for f in files]), URI, str(folder), str(output)],
        cwd=ROOT,
        env={**os.environ, "PATH": VENV_PATH},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == [] and result["runtime"].startswith("onnxruntime") and result["score"] == 0
    for row, expected in zip(result["rows"], keras_rows, strict=True):
        assert_same_row(row, expected)
    table = pq.read_table(output).to_pandas().set_index("path")
    for i, expected in enumerate(keras_rows):
        row = table.loc[f"{i:02d}.jpg"]
        assert row.error is None
        assert_same_label(row.label, expected["label"], expected["probabilities"])
        assert row.confidence == close(expected["confidence"])
        assert row.familiarity == close(expected["familiarity"])
        assert_same_neighbours(list(row.similar_ids), expected["similar"])


def tiny_network(image_size: int = 16):
    from pyfunc.model import with_embedding
    from steps.defaults import Hyperparameters
    from steps.train import build_model, familiarity_layers

    classifier = build_model(Hyperparameters(conv_blocks=2, filters=4, dense_units=8), image_size, 3)
    return with_embedding(classifier, familiarity_layers(classifier))


def test_the_export_matches_keras_on_every_output(tmp_path):
    network = tiny_network()
    images = np.random.default_rng(0).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    outputs, difference = onnx_export.export_checked(network, 16, tmp_path / "network.onnx", images)
    assert len(outputs) == len(network.outputs) == 4 and difference <= onnx_export.TOLERANCE


def test_a_wrong_export_fails_the_logging_in_one_line(pipeline, tmp_path, monkeypatch, capsys):
    """A graph with one weight changed after the export: training says by how much, logs no model."""
    import onnx
    from onnx import numpy_helper

    from steps import train

    real_export = onnx_export.export

    def wrong_export(network, image_size: int, path: Path) -> list[str]:
        outputs = real_export(network, image_size, path)
        graph = onnx.load(str(path))
        weight = max(graph.graph.initializer, key=lambda tensor: np.prod(tensor.dims))
        values = numpy_helper.to_array(weight)
        weight.CopyFrom(numpy_helper.from_array(values + np.float32(0.5), weight.name))
        onnx.save(graph, str(path))
        return outputs

    monkeypatch.setattr(onnx_export, "export", wrong_export)
    experiments = [experiment.experiment_id for experiment in mlflow.search_experiments()]
    before = len(mlflow.search_logged_models(experiments, output_format="list"))
    code = train.main(["--db", str(pipeline.db), "--image-size", "16", "--epochs", "1", "--conv-blocks", "2", "--filters", "4"])
    stderr = capsys.readouterr().err
    error = [line for line in stderr.splitlines() if "error" in line.lower()]  # not the progress lines
    assert code == 2 and "Traceback" not in stderr
    assert len(error) == 1 and error[0].startswith("train: error: the ONNX export differs from the Keras model by "), error
    assert "validation images: not logged" in error[0]
    assert len(mlflow.search_logged_models(experiments, output_format="list")) == before
