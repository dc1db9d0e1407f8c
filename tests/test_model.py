"""The served model's contract (DESIGN.md), in Python and over `mlflow models serve`."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

COLUMNS = ["label", "confidence", "probabilities", "uncertain", "similar", "error", "unfamiliar", "familiarity"]


@pytest.fixture(scope="module")
def model(pipeline):
    return mlflow.pyfunc.load_model("models:/animal/Production")


@pytest.fixture(scope="module")
def images(pipeline) -> dict[str, bytes]:
    return {label: next(pipeline.image_store.glob(f"val/{label}/*.jpg")).read_bytes() for label in ("cat", "dog", "wild")}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def check_answer(row: dict, k: int) -> None:
    assert row["label"] in ("cat", "dog", "wild") and row["error"] is None
    assert set(row["probabilities"]) == {"cat", "dog", "wild"}
    assert abs(sum(row["probabilities"].values()) - 1) < 1e-3
    assert row["confidence"] == max(row["probabilities"].values())
    assert row["probabilities"][row["label"]] == row["confidence"]
    assert 0 < len(row["similar"]) <= k
    assert [s["score"] for s in row["similar"]] == sorted((s["score"] for s in row["similar"]), reverse=True)
    for item in row["similar"]:
        assert set(item) == {"id", "path", "label", "score"} and item["label"] == row["label"]
    assert isinstance(row["unfamiliar"], bool) and 0 <= row["familiarity"] <= 1
    assert row["unfamiliar"] == (row["familiarity"] < 0.05)  # the stored flag share (FLAG_SHARE)


def test_base64_and_raw_bytes_give_the_same_answer(model, images):
    frame = pd.DataFrame({"image": [b64(images["cat"]), images["cat"]]})
    out = model.predict(frame)
    assert list(out.columns) == COLUMNS and len(out) == 2
    first, second = out.to_dict("records")
    check_answer(first, k=5)
    assert first == second


def test_params_k_and_threshold(model, images):
    frame = pd.DataFrame({"image": [b64(images[label]) for label in ("cat", "dog", "wild")]})
    assert all(len(s) <= 2 for s in model.predict(frame, params={"k": 2}).similar)
    assert model.predict(frame, params={"k": 0}).similar.map(len).eq(0).all()
    assert model.predict(frame, params={"threshold": 1.0}).uncertain.all()
    assert not model.predict(frame, params={"threshold": 0.0}).uncertain.any()
    default = model.predict(frame)
    assert (default.uncertain == (default.confidence.astype(float) < 0.6)).all()


def test_a_bad_row_gets_an_error_and_the_others_are_answered(model, images):
    frame = pd.DataFrame({"image": [b64(images["dog"]), "%%% not base64", b64(b"plain text"), "", b64(images["wild"])]})
    out = model.predict(frame).to_dict("records")
    check_answer(out[0], 5)
    check_answer(out[4], 5)
    assert "invalid base64" in out[1]["error"]
    assert "not an image" in out[2]["error"]
    assert "empty" in out[3]["error"]
    for row in out[1:4]:
        assert row["label"] is None and row["confidence"] is None and row["similar"] == []
        assert row["unfamiliar"] is None and row["familiarity"] is None


def test_wrong_column_and_bad_params_are_clear_errors(model, images):
    with pytest.raises(Exception, match=r"missing inputs \['image'\]"):
        model.predict(pd.DataFrame({"picture": [b64(images["cat"])]}))
    with pytest.raises(Exception, match="k must be"):
        model.predict(pd.DataFrame({"image": [b64(images["cat"])]}), params={"k": 1000})


def test_similar_images_exist_in_the_catalogue(model, images, pipeline):
    from databases import catalogue

    conn = catalogue.connect(pipeline.db, readonly=True)
    for item in model.predict(pd.DataFrame({"image": [b64(images["cat"])]})).similar[0]:
        row = conn.execute("SELECT path, label FROM images WHERE id = ?", (item["id"],)).fetchone()
        assert (row["path"], row["label"]) == (item["path"], item["label"])
    conn.close()


def test_model_version_is_tagged(pipeline):
    version = mlflow.MlflowClient().get_model_version("animal", pipeline.version)
    assert 0 <= float(version.tags["val_accuracy"]) <= 1
    assert len(version.tags["catalogue_sha256"]) == 64
    alias = mlflow.MlflowClient().get_model_version_by_alias("animal", "production")
    assert str(alias.version) == pipeline.version and version.current_stage == "Production"


@pytest.mark.parametrize("payload", ["split", "records"])
def test_http_contract(scoring_server, images, payload):
    data = [b64(images["cat"]), "not base64!", b64(images["wild"])]
    body = (
        {"dataframe_split": {"columns": ["image"], "data": [[d] for d in data]}}
        if payload == "split"
        else {"dataframe_records": [{"image": d} for d in data]}
    )
    body["params"] = {"k": 3, "threshold": 0.99}
    response = requests.post(
        f"{scoring_server}/invocations", data=json.dumps(body), headers={"Content-Type": "application/json"}, timeout=60
    )
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == 3 and set(rows[0]) == set(COLUMNS)
    check_answer(rows[0], k=3)
    check_answer(rows[2], k=3)
    assert rows[0]["uncertain"] is True  # tiny model, threshold 0.99
    assert rows[1]["label"] is None and "invalid base64" in rows[1]["error"]
    assert rows[1]["unfamiliar"] is None and rows[1]["familiarity"] is None


def test_http_wrong_column_is_a_client_error(scoring_server):
    response = requests.post(
        f"{scoring_server}/invocations", json={"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, timeout=60
    )
    assert 400 <= response.status_code < 500
    assert requests.get(f"{scoring_server}/ping", timeout=5).ok  # and it keeps serving


def test_signature_lists_unfamiliar_and_familiarity(pipeline):
    info = mlflow.models.get_model_info("models:/animal/Production")
    outputs = {spec.name: str(spec.type) for spec in info.signature.outputs.inputs}
    assert outputs["unfamiliar"].endswith("boolean") and outputs["familiarity"].endswith("double")


def test_the_stored_calibration_decides_unfamiliar(pipeline, images, tmp_path):
    """The threshold lives in the model's files (config.json, familiarity.npz) and is what predict uses:
    shrink the stored validation distances and every image is unfamiliar; stretch them and none is."""

    from pyfunc.familiarity import Familiarity

    local = Path(mlflow.artifacts.download_artifacts("models:/animal/Production", dst_path=str(tmp_path)))
    config = json.loads((local / "artifacts" / "config.json").read_text())
    stored = Familiarity.load(local / "artifacts" / "familiarity.npz")
    assert config["familiarity"]["threshold"] == pytest.approx(stored.threshold)
    assert config["familiarity"]["flag_share"] == stored.flag_share == 0.05
    run = mlflow.MlflowClient().get_run(pipeline.run_id)
    assert run.data.metrics["familiarity_threshold"] == pytest.approx(stored.threshold)
    frame = pd.DataFrame({"image": [b64(images[label]) for label in ("cat", "dog", "wild")]})
    for scale, expected in ((1e-9, True), (1e9, False)):
        Familiarity(stored.means, stored.whitening, stored.reference * scale, stored.flag_share).save(
            local / "artifacts" / "familiarity.npz"
        )
        out = mlflow.pyfunc.load_model(str(local)).predict(frame)
        assert out.unfamiliar.tolist() == [expected] * 3


def test_batch_scoring_writes_both_fields(pipeline, model, tmp_path):
    import pyarrow.parquet as pq

    from steps import score as scoring

    folder = pipeline.image_store / "val"
    scoring.score(folder, tmp_path / "out.parquet", "models:/animal/Production", interactive=False)
    table = pq.read_table(tmp_path / "out.parquet").to_pandas().set_index("path")
    assert {"unfamiliar", "familiarity"} <= set(table.columns)
    for path, row in table.iterrows():
        answer = model.predict(pd.DataFrame({"image": [(folder / path).read_bytes()]})).iloc[0]
        assert bool(row.unfamiliar) == answer.unfamiliar and row.familiarity == pytest.approx(answer.familiarity, abs=1e-3)
