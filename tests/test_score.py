"""Batch scoring (steps/score.py): every kind of bad file among good ones, a .zip, a list of paths,
an interrupted run resumed (in-process Ctrl-C and a killed process), a re-run that changes nothing,
and the `score` entry point through `mlflow run`."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from steps import score as scoring
from steps.defaults import SCORE_MODEL_URI
from tests.conftest import ROOT, VENV_PATH
from tests.outputs import TOLERANCE, assert_same_label, assert_same_neighbours, close

# What each bad file's row must say (a substring of its `error`).
BAD = {
    "bad/not_an_image.jpg": "not an image",
    "bad/empty.jpg": "empty image",
    "bad/truncated.jpg": "could not decode image",
    "bad/too_many_pixels.png": "image too large",
    "bad/too_big_a_file.jpg": "file too large",
    # Unreadable files. The tests run as root, for whom chmod 000 changes nothing, so these are
    # files that no one can read: a link to nothing, a link to itself, a FIFO (reading it would
    # block forever: the reader must refuse it without opening it).
    "bad/dangling_link.jpg": "cannot read: No such file",
    "bad/link_loop.jpg": "cannot read: Too many levels of symbolic links",
    "bad/fifo.jpg": "cannot read: not a regular file",
}


def good_images(pipeline, count: int) -> list[Path]:
    """`count` catalogue images, spread over the labels."""
    files = sorted(pipeline.image_store.rglob("*.jpg"))
    return files[:: max(1, len(files) // count)][:count]


def reformat(data: bytes, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def collection(pipeline, tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """A folder of good images at several depths and formats, a duplicate, every kind of bad file,
    and files that are not images (ignored). Returns (folder, {path of a readable image: bytes})."""
    root = tmp_path_factory.mktemp("collection")
    good: dict[str, bytes] = {}
    for i, source in enumerate(good_images(pipeline, 9)):
        data = source.read_bytes()
        relative = ["top.jpg", "a/one.jpg", "a/b/two.JPG", "a/b/c/d/deep.jpeg"][i] if i < 4 else f"more/{i}.jpg"
        if i == 5:
            relative, data = "more/as.png", reformat(data, "PNG")
        elif i == 6:
            relative, data = "more/as.webp", reformat(data, "WEBP")
        elif i == 7:
            relative, data = "more/as.gif", reformat(data, "GIF")
        good[relative] = data
    good["copies/same_content.jpg"] = good["top.jpg"]
    for relative, data in good.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(data)

    bad = root / "bad"
    bad.mkdir()
    (bad / "not_an_image.jpg").write_text("this is a text file with a .jpg name\n")
    (bad / "empty.jpg").write_bytes(b"")
    jpeg = good["top.jpg"]
    (bad / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    Image.new("1", (7000, 6000)).save(bad / "too_many_pixels.png")  # 42 million pixels, a 6 KB file
    with open(bad / "too_big_a_file.jpg", "wb") as handle:  # sparse: 51 MB on paper, nothing on disk
        handle.truncate(scoring.MAX_FILE_BYTES + 2**20)
    (bad / "dangling_link.jpg").symlink_to(root / "nowhere.jpg")
    (bad / "link_loop.jpg").symlink_to(bad / "link_loop.jpg")
    os.mkfifo(bad / "fifo.jpg")
    (root / "notes.txt").write_text("not an image, not a row")
    (root / ".hidden.jpg").write_bytes(jpeg)
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.jpg").write_bytes(jpeg)
    return root, good


def copy_collection(folder: Path, target: Path) -> Path:
    """A copy of the collection (its FIFO and sparse file made anew: copying would block or fill the disk)."""
    special = {"fifo.jpg", "too_big_a_file.jpg"}
    shutil.copytree(folder, target, symlinks=True, ignore=lambda _, names: [n for n in names if n in special])
    os.mkfifo(target / "bad" / "fifo.jpg")
    with open(target / "bad" / "too_big_a_file.jpg", "wb") as handle:
        handle.truncate(scoring.MAX_FILE_BYTES + 2**20)
    return target


@pytest.fixture(scope="module")
def model(pipeline):
    return mlflow.pyfunc.load_model(SCORE_MODEL_URI)


def direct_answers(model, images: dict[str, bytes]) -> pd.DataFrame:
    """What the pyfunc says about each image when asked directly, as the scoring server would."""
    frame = model.predict(pd.DataFrame({"image": list(images.values())}))
    frame.index = list(images)
    return frame


def check_rows(table: pd.DataFrame, good: dict[str, bytes], model, bad: dict[str, str] = BAD) -> None:
    """Every good image has the pyfunc's own answer, every bad file its error, nothing else is there."""
    labels = scoring.Columns.of(model.metadata.signature).labels
    assert sorted(table.path) == sorted([*good, *bad])
    assert table.path.is_unique
    rows = table.set_index("path")
    expected = direct_answers(model, good)
    for path, data in good.items():
        row, answer = rows.loc[path], expected.loc[path]
        assert row.error is None, (path, row.error)
        assert row.sha256 == hashlib.sha256(data).hexdigest()
        assert row.label in labels
        assert_same_label(row.label, answer.label, answer.probabilities)
        assert row.confidence == close(answer.confidence)
        for label in labels:
            assert row[f"p_{label}"] == close(answer.probabilities[label])
        assert row.confidence == pytest.approx(max(row[f"p_{label}"] for label in labels))
        if abs(answer.confidence - 0.6) > TOLERANCE:  # the default threshold: a tie may fall either way
            assert bool(row.uncertain) == bool(answer.uncertain)
        assert_same_neighbours(list(row.similar_ids), answer.similar)
        assert len(row.similar_ids) > 0
    for path, reason in bad.items():
        row = rows.loc[path]
        assert row.error is not None and reason in row.error, (path, row.error)
        assert row.label is None and pd.isna(row.confidence)
        assert list(row.similar_ids) == []


def test_every_file_is_a_row_and_bad_files_never_stop_the_job(collection, model, tmp_path):
    folder, good = collection
    output = tmp_path / "predictions.parquet"
    result = scoring.score(folder, output, SCORE_MODEL_URI, batch_size=4, interactive=False)

    table = pq.read_table(output).to_pandas()
    check_rows(table, good, model)
    assert list(table.columns) == result.table.columns.tolist()
    assert [name for name in table.columns if name.startswith("p_")] == [
        f"p_{label}" for label in scoring.Columns.of(model.metadata.signature).labels
    ]
    assert not (tmp_path / "predictions.parquet.partial").exists()
    summary = result.summary
    assert summary.files == len(good) + len(BAD) and summary.scored_now == summary.files
    assert summary.errors == len(BAD)
    assert sum(summary.labels.values()) == len(good)
    assert summary.duplicates == 1
    assert summary.ignored == {".txt": 1}  # hidden files and folders are skipped, not counted
    assert summary.error_kinds["cannot read"] == 3
    shown = "\n".join(summary.lines(output))
    assert "errors 8" in shown and "uncertain" in shown


def test_same_content_is_scored_once(collection, tmp_path, monkeypatch):
    folder, good = collection
    scored: list[int] = []
    original = scoring.predict

    def counting(model, images, columns):
        scored.append(len(images))
        return original(model, images, columns)

    monkeypatch.setattr(scoring, "predict", counting)
    scoring.score(folder, tmp_path / "out.parquet", SCORE_MODEL_URI, batch_size=3, interactive=False)
    # The copy is not sent to the model, nor are the unreadable files; the undecodable ones are (the
    # model's answer is their error).
    unreadable = sum(1 for reason in BAD.values() if reason.startswith(("cannot read", "file too large")))
    assert sum(scored) == len(good) - 1 + len(BAD) - unreadable


def test_csv_output_and_a_rerun_changes_nothing_but_new_files(collection, model, tmp_path):
    folder, good = collection
    copy = copy_collection(folder, tmp_path / "photos")
    output = tmp_path / "predictions.csv"
    scoring.score(copy, output, SCORE_MODEL_URI, interactive=False)
    first = output.read_bytes()
    check_rows(scoring._from_csv(output), good, model)

    before = output.stat().st_mtime_ns
    again = scoring.score(copy, output, SCORE_MODEL_URI, interactive=False)
    assert again.summary.scored_now == 0
    assert output.read_bytes() == first and output.stat().st_mtime_ns == before

    (copy / "new.png").write_bytes(reformat(good["a/one.jpg"], "PNG"))
    grown = scoring.score(copy, output, SCORE_MODEL_URI, interactive=False)
    assert grown.summary.scored_now == 1
    check_rows(scoring._from_csv(output), {**good, "new.png": (copy / "new.png").read_bytes()}, model)


def test_a_zip_with_a_broken_entry(collection, model, tmp_path):
    folder, good = collection
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as bundle:
        for relative, data in good.items():
            bundle.writestr(f"photos/{relative}", data)
        bundle.writestr("photos/broken.jpg", good["top.jpg"])
        bundle.writestr("photos/notes.txt", "ignored")
        bundle.writestr("__MACOSX/photos/._top.jpg", b"resource fork")
    # Damage the stored bytes of one entry: its CRC no longer matches.
    raw = bytearray(archive.read_bytes())
    start = raw.rindex(good["top.jpg"][:64])  # the last copy is broken.jpg's
    raw[start + 200 : start + 264] = bytes(64)
    archive.write_bytes(bytes(raw))

    result = scoring.score(archive, tmp_path / "zip.parquet", SCORE_MODEL_URI, batch_size=4, interactive=False)
    table = result.table.assign(path=result.table.path.str.removeprefix("photos/"))
    check_rows(table, good, model, {"broken.jpg": "cannot read from the .zip: Bad CRC-32"})
    assert result.summary.ignored == {".txt": 1}  # and the __MACOSX entry is skipped


def test_a_list_of_paths(collection, model, tmp_path):
    folder, good = collection
    listing = tmp_path / "list.txt"
    listing.write_text("# my photos\n" + "".join(f"{folder / p}\n" for p in good if p != "top.jpg") + "\nrelative/missing.jpg\n")
    shutil.copy(folder / "top.jpg", tmp_path / "top.jpg")
    listing.write_text(listing.read_text() + "top.jpg\n")  # relative to the list's folder
    table = scoring.score(listing, tmp_path / "list.parquet", SCORE_MODEL_URI, interactive=False).table
    renamed = {str(folder / p): data for p, data in good.items() if p != "top.jpg"} | {"top.jpg": good["top.jpg"]}
    check_rows(table, renamed, model, {"relative/missing.jpg": "cannot read: No such file"})


def test_interrupted_then_resumed_loses_and_repeats_nothing(collection, model, tmp_path, monkeypatch):
    folder, good = collection
    output = tmp_path / "resumed.parquet"
    written = []
    original = scoring.Store.write_part

    def interrupted_after_two(store, rows):
        if len(written) == 2:
            raise KeyboardInterrupt  # as Ctrl-C does, between two batches
        written.append(len(rows))
        original(store, rows)

    monkeypatch.setattr(scoring.Store, "write_part", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        scoring.score(folder, output, SCORE_MODEL_URI, batch_size=3, interactive=False)
    assert not output.exists()
    assert len(list((tmp_path / "resumed.parquet.partial").glob("part-*.parquet"))) == 2
    monkeypatch.setattr(scoring.Store, "write_part", original)

    result = scoring.score(folder, output, SCORE_MODEL_URI, batch_size=3, interactive=False)
    assert result.summary.scored_now == len(good) + len(BAD) - 6
    check_rows(pq.read_table(output).to_pandas(), good, model)


def test_killed_then_resumed(pipeline, collection, model, tmp_path):
    """kill -9 in the middle of a run: the parts written survive, the output does not exist yet,
    and the same command finishes the job with every row once."""
    folder, good = collection
    many = tmp_path / "many"
    many.mkdir()
    sources = list(good)
    for i in range(1500):  # links to a few images: many rows (and parts), few model calls
        (many / f"{i:04d}.jpg").symlink_to(folder / sources[i % len(sources)])
    output = tmp_path / "killed.parquet"
    partial = tmp_path / "killed.parquet.partial"
    command = [sys.executable, "-m", "steps.score", "--input", str(many), "--output", str(output), "--batch-size", "1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": pipeline.tracking_uri, "PATH": VENV_PATH}
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if partial.is_dir() and len(list(partial.glob("part-*.parquet"))) >= 20:
                break
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
    assert not output.exists()
    parts = len(list(partial.glob("part-*.parquet")))
    assert 20 <= parts < 1500

    result = scoring.score(many, output, SCORE_MODEL_URI, batch_size=64, interactive=False)
    assert result.summary.scored_now == 1500 - parts
    table = pq.read_table(output).to_pandas()
    assert sorted(table.path) == [f"{i:04d}.jpg" for i in range(1500)]
    assert table.error.isna().all()
    by_content = table.groupby("sha256").label.nunique()
    assert (by_content == 1).all() and len(by_content) == len(set(good.values()))


def test_columns_follow_the_models_output_schema():
    """Class names come from the model; `unfamiliar` and `familiarity` appear when the model has them."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Object, Property

    def signature(*extra):
        probabilities = Object([Property(name, "double") for name in ("fox", "owl")])
        return ModelSignature(
            inputs=Schema([ColSpec("string", "image")]),
            outputs=Schema([ColSpec("string", "label"), ColSpec(probabilities, "probabilities"), *extra]),
        )

    old = scoring.Columns.of(signature())
    assert old.labels == ("fox", "owl") and old.optional == ()
    assert "unfamiliar" not in old.names and old.names[-2:] == ["similar_ids", "error"]
    new = scoring.Columns.of(signature(ColSpec("boolean", "unfamiliar"), ColSpec("double", "familiarity")))
    assert new.names == [
        "path",
        "sha256",
        "label",
        "confidence",
        "p_fox",
        "p_owl",
        "uncertain",
        "unfamiliar",
        "familiarity",
        "similar_ids",
        "error",
    ]
    answer = new.answer(
        {
            "label": "owl",
            "confidence": 0.9,
            "probabilities": {"fox": 0.1, "owl": 0.9},
            "uncertain": False,
            "unfamiliar": True,
            "familiarity": -3.5,
            "similar": [{"id": 4, "path": "x", "label": "owl", "score": 0.9}],
            "error": None,
        }
    )
    assert answer == {
        "label": "owl",
        "confidence": 0.9,
        "p_fox": 0.1,
        "p_owl": 0.9,
        "uncertain": False,
        "unfamiliar": True,
        "familiarity": -3.5,
        "similar_ids": [4],
        "error": None,
    }
    assert set(answer) == set(new.answer_columns)


def test_bad_arguments_are_one_line_errors(pipeline, tmp_path, capsys):
    assert scoring.main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o.parquet")]) == 2
    assert scoring.main(["--input", str(tmp_path), "--output", str(tmp_path / "o.json")]) == 2
    assert scoring.main(["--input", str(tmp_path), "--output", str(tmp_path / "o.csv"), "--model-uri", "models:/no-such-model/1"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("score")]
    assert [line.split(":")[:2] for line in errors] == [["score", " error"]] * 3
    assert "input not found" in errors[0] and ".parquet or .csv" in errors[1] and "no model at" in errors[2]


def test_the_entry_point_logs_the_run(pipeline, collection, tmp_path):
    """`mlflow run . -e score`: the output, and a run named `score` with counts and a contact sheet."""
    folder, good = collection
    output = tmp_path / "run.parquet"
    env = {**os.environ, "MLFLOW_TRACKING_URI": pipeline.tracking_uri, "PATH": VENV_PATH}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlflow",
            "run",
            str(ROOT),
            "-e",
            "score",
            "--env-manager",
            "local",
            "-P",
            f"input={folder}",
            "-P",
            f"output={output}",
            "-P",
            "batch_size=8",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{len(good) + len(BAD)} files -> {output}" in done.stdout
    assert pq.read_table(output).num_rows == len(good) + len(BAD)
    run = mlflow.search_runs(
        filter_string="tags.mlflow.runName = 'score'", order_by=["start_time DESC"], max_results=1, output_format="list"
    )[0]
    assert run.data.metrics["errors"] == len(BAD) and run.data.metrics["files"] == len(good) + len(BAD)
    assert run.data.params["model_uri"] == SCORE_MODEL_URI
    artifacts = {item.path for item in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"run.parquet", "contact_sheet.png", "summary.json"} <= artifacts
    sheet = Image.open(
        mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="contact_sheet.png", dst_path=str(tmp_path))
    )
    labels = pq.read_table(output).to_pandas().label.nunique()
    assert sheet.size == (128 * 6, (labels + 1) * (18 + 128 + 30))  # a row per predicted label, and the least confident


def test_the_output_follows_the_input_order_with_files_no_longer_in_it_last(tmp_path):
    """Store.finish: rows in the input's order whatever order the parts came in; rows of files gone
    from the input keep their own order, after the rest."""
    columns = scoring.Columns(("cat", "dog"))
    store = scoring.Store(tmp_path / "out.parquet", columns, "models:/m/1")
    row = lambda path: {"path": path, "sha256": path, **columns.failed("test")}  # noqa: E731
    store.write_part([row("c.jpg"), row("gone2.jpg"), row("a.jpg")])
    store.write_part([row("gone1.jpg"), row("b.jpg")])
    table = store.finish(["a.jpg", "b.jpg", "c.jpg"])
    assert table.path.tolist() == ["a.jpg", "b.jpg", "c.jpg", "gone2.jpg", "gone1.jpg"]
    assert pq.read_table(tmp_path / "out.parquet").column("path").to_pylist() == table.path.tolist()
