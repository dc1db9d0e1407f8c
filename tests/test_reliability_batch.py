"""The batch and ingest findings of an outside probe (issue 19, section 2), each reproduced and shown
fixed: `score` on bad lists, outputs and inputs, lying and bombing .zip files, changed files, two
runs on one output and formula cells in CSV; `extract` and symlinks planted in the image store;
`populate` on files and rows that are not what extract writes.

`score` runs here on a stand-in for the model (the same signature, answers made from the bytes):
what is tested is the job around the model, which tests/test_score.py runs on the real one."""

from __future__ import annotations

import csv
import importlib
import os
import signal
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow.parquet as pq
import pytest

from databases.image_store import FolderStore, ObjectStore, StoreError, safe_key
from steps import extract as extracting
from steps import populate as populating
from steps import score as scoring
from tests.conftest import ROOT
from tests.test_extract import jpeg

LABELS = ("cat", "dog")


class FakeModel:
    """Answers like the pyfunc: a label from the bytes, an error for what does not start with b'IMG'."""

    def __init__(self):
        self.calls: list[list[bytes]] = []

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.calls.append(list(frame.image))
        return pd.DataFrame([self.answer(data) for data in frame.image])

    @staticmethod
    def answer(data: bytes) -> dict:
        if not data.startswith(b"IMG"):
            return {"label": None, "confidence": None, "probabilities": None, "uncertain": None, "similar": [], "error": "not an image"}
        label = LABELS[sum(data) % 2]
        probabilities = {name: 0.9 if name == label else 0.1 for name in LABELS}
        return {"label": label, "confidence": 0.9, "probabilities": probabilities, "uncertain": False, "similar": [], "error": None}


@pytest.fixture
def model(monkeypatch) -> SimpleNamespace:
    """The stand-in behind mlflow's own calls; `loads` counts the times the model was loaded."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Object, Property

    probabilities = Object([Property(name, "double") for name in LABELS])
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec(probabilities, "probabilities")]),
    )
    fake = SimpleNamespace(model=FakeModel(), loads=[])
    # On the modules themselves: `mlflow.pyfunc` may be a lazy loader until first used.
    models, pyfunc = importlib.import_module("mlflow.models"), importlib.import_module("mlflow.pyfunc")
    monkeypatch.setattr(models, "get_model_info", lambda uri: SimpleNamespace(signature=signature, model_uuid="fake"))

    def load(uri):
        fake.loads.append(uri)
        return fake.model

    monkeypatch.setattr(pyfunc, "load_model", load)
    return fake


def score(source: Path, output: Path, **kwargs) -> scoring.Result:
    return scoring.score(source, output, "models:/fake/1", interactive=False, **kwargs)


def one_line_error(capsys) -> str:
    """The one line `score: error: ...` a refused run printed (and nothing like a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("score: error: "), err
    return lines[0]


def photos(folder: Path, names: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in names.items():
        (folder / name).write_bytes(data)
    return folder


# --- 1. a list file with a NUL byte --------------------------------------------------------------


def test_a_list_line_with_a_nul_byte_is_an_error_row_and_the_job_goes_on(model, tmp_path):
    photos(tmp_path, {"a.jpg": b"IMG a"})
    listing = tmp_path / "list.txt"
    listing.write_text("a.jpg\nb\0c.jpg\n~no_such_user_here/x.jpg\n")
    table = score(listing, tmp_path / "out.parquet").table.set_index("path")
    assert table.loc["b\0c.jpg", "error"] == "cannot read: the path holds a NUL byte"
    assert table.loc["~no_such_user_here/x.jpg", "error"].startswith("cannot read: No such file")
    assert table.loc["a.jpg", "label"] in LABELS and pd.isna(table.loc["a.jpg", "error"])


# --- 2. an output that is not ours, a folder that cannot be written --------------------------------


@pytest.mark.parametrize(
    "name, content",
    [
        ("o.parquet", b"not a parquet file"),
        ("o.parquet", b""),
        ("o.csv", b"name,age\nrex,3\n"),
        ("o.csv", b"\xff\xfe\x00binary"),
    ],
)
def test_an_output_that_is_not_a_score_table_is_refused_before_the_model_loads(model, tmp_path, capsys, name, content):
    photos(tmp_path / "in", {"a.jpg": b"IMG a"})
    output = tmp_path / name
    output.write_bytes(content)
    assert scoring.main(["--input", str(tmp_path / "in"), "--output", str(output), "--model-uri", "models:/fake/1"]) == 2
    assert f"the output {output} exists and is not" in one_line_error(capsys)
    assert model.loads == [] and output.read_bytes() == content
    assert not output.with_name(name + ".partial").exists() and not output.with_name(name + ".lock").exists()


@pytest.mark.parametrize(
    "name, content", [("manifest.json", b"{not json"), ("part-000000.parquet", b"not parquet"), ("part-x.parquet", b"")]
)
def test_parts_that_score_did_not_write_are_refused_before_the_model_loads(model, tmp_path, capsys, name, content):
    photos(tmp_path / "in", {"a.jpg": b"IMG a"})
    output = tmp_path / "o.parquet"
    (tmp_path / "o.parquet.partial").mkdir()
    (tmp_path / "o.parquet.partial" / name).write_bytes(content)
    assert scoring.main(["--input", str(tmp_path / "in"), "--output", str(output), "--model-uri", "models:/fake/1"]) == 2
    assert "o.parquet.partial holds a file that score did not write" in one_line_error(capsys)
    assert model.loads == [] and (tmp_path / "o.parquet.partial" / name).read_bytes() == content


def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(model, tmp_path, capsys, monkeypatch):
    photos(tmp_path / "in", {"a.jpg": b"IMG a"})
    (tmp_path / "not-a-folder").write_text("a file where the output's folder should be")
    listed = []
    monkeypatch.setattr(scoring, "list_inputs", lambda source: listed.append(source))
    output = tmp_path / "not-a-folder" / "o.parquet"
    assert scoring.main(["--input", str(tmp_path / "in"), "--output", str(output), "--model-uri", "models:/fake/1"]) == 2
    assert "cannot write the output" in one_line_error(capsys)
    assert listed == [] and model.loads == []


# --- 3. .zip members that lie about their size, and zip bombs --------------------------------------


def lying_zip(path: Path, real: int, declared: int) -> Path:
    """A .zip of one deflated member, `real` zero bytes, whose headers (local and central) say `declared`."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("photo.jpg", b"IMG" + bytes(real - 3))
    raw = bytearray(path.read_bytes())
    local, central = raw.index(b"PK\x03\x04"), raw.index(b"PK\x01\x02")
    struct.pack_into("<I", raw, local + 22, declared)
    struct.pack_into("<I", raw, central + 24, declared)
    path.write_bytes(bytes(raw))
    return path


def test_a_zip_member_that_lies_about_its_size_is_an_error_row_read_within_the_cap(model, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_FILE_BYTES", 10_000)
    inflated = []
    monkeypatch.setattr(zlib, "decompressobj", counting_decompressobj(zlib.decompressobj, inflated))
    archive = lying_zip(tmp_path / "lying.zip", real=4 * 2**20, declared=1_000)  # 4 MiB inside, 1,000 bytes declared
    table = score(archive, tmp_path / "out.parquet").table
    assert table.error.tolist() == ["cannot read from the .zip: Bad CRC-32 for file 'photo.jpg'"]
    assert 0 < max(inflated) <= scoring.MAX_FILE_BYTES + 1


def test_the_read_ahead_holds_a_bounded_number_of_bytes(tmp_path, monkeypatch):
    """40 files of the largest allowed size (a zip bomb's members) are never all held at once: the reads
    ahead hold at most READ_AHEAD_BYTES, whatever the depth asked for."""
    monkeypatch.setattr(scoring, "MAX_FILE_BYTES", 1_000)
    entries = [scoring.Entry(f"{i}.jpg", str(photos(tmp_path, {f"{i}.jpg": b"IMG" + bytes(997)}) / f"{i}.jpg")) for i in range(40)]
    started, lock = [0], threading.Lock()
    original = scoring.read_hashed

    def counted(entry):
        with lock:
            started[0] += 1
        return original(entry)

    monkeypatch.setattr(scoring, "read_hashed", counted)
    most = 0
    with ThreadPoolExecutor(scoring.READERS) as pool:
        for consumed, read in enumerate(scoring._read_ahead(pool, entries, depth=512, max_bytes=5_000), start=1):
            assert read.error is None
            most = max(most, (started[0] - consumed) * 1_000)  # bytes read (or being read) and not yet taken
    assert consumed == 40 and most <= 5_000


def test_batches_end_at_batch_bytes_and_the_model_is_never_sent_more(model, tmp_path, monkeypatch):
    monkeypatch.setattr(scoring, "MAX_FILE_BYTES", 1_000)
    monkeypatch.setattr(scoring, "BATCH_BYTES", 3_000)
    with zipfile.ZipFile(tmp_path / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as archive:
        for i in range(40):
            archive.writestr(f"{i:02d}.jpg", b"IMG" + bytes([i]) * 997)  # distinct contents: each one goes to the model
    table = score(tmp_path / "bomb.zip", tmp_path / "out.parquet", batch_size=100).table
    assert len(table) == 40 and table.error.isna().all()
    assert sum(map(len, model.model.calls)) == 40 and max(sum(map(len, call)) for call in model.model.calls) <= 3_000


# --- 4. a FIFO, socket or device as the input ------------------------------------------------------


@pytest.mark.parametrize("name", ["photos", "photo.jpg", "photos.zip"])
def test_a_fifo_as_input_is_a_one_line_error_not_a_hang(tmp_path, name):
    os.mkfifo(tmp_path / name)
    done = subprocess.run(
        [sys.executable, "-m", "steps.score", "--input", str(tmp_path / name), "--output", str(tmp_path / "o.parquet")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,  # a safety net: without the check, reading the FIFO would wait for ever
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr
    refused = f"score: error: input {tmp_path / name} is not a folder nor a regular file (a FIFO, socket or device cannot be scored)"
    assert done.stderr.strip().splitlines() == [refused]


def test_a_device_as_input_is_a_one_line_error(tmp_path):
    with pytest.raises(scoring.InputError, match="not a folder nor a regular file"):
        scoring.list_inputs(Path("/dev/null"))


# --- 5. files changed or gone between two runs -----------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_changed_file_is_scored_again_and_a_gone_file_says_so(model, tmp_path, suffix):
    folder = photos(tmp_path / "in", {"a.jpg": b"IMG a", "b.jpg": b"IMG b", "c.jpg": b"IMG c"})
    output = tmp_path / f"out{suffix}"
    first = score(folder, output).table.set_index("path")
    old = os.stat(folder / "b.jpg")
    (folder / "b.jpg").write_bytes(b"IMG d")  # same size; its date put back: only the content tells
    os.utime(folder / "b.jpg", ns=(old.st_atime_ns, old.st_mtime_ns))
    (folder / "c.jpg").unlink()

    second = score(folder, output)
    assert second.summary.scored_now == 1
    table = second.table
    assert table.path.tolist() == ["a.jpg", "b.jpg", "c.jpg"]  # the gone file last
    rows = table.set_index("path")
    assert rows.loc["b.jpg", "sha256"] != first.loc["b.jpg", "sha256"] and rows.loc["b.jpg", "label"] == FakeModel.answer(b"IMG d")["label"]
    assert rows.loc["a.jpg", "sha256"] == first.loc["a.jpg", "sha256"]
    assert rows.loc["c.jpg", "error"] == scoring.GONE and pd.isna(rows.loc["c.jpg", "label"]) and pd.isna(rows.loc["c.jpg", "sha256"])
    assert second.summary.error_kinds == {"gone from the input": 1}

    written = output.stat().st_mtime_ns
    assert score(folder, output).summary.scored_now == 0 and output.stat().st_mtime_ns == written  # nothing new: left as it is

    (folder / "c.jpg").write_bytes(b"IMG c")  # back again: scored, its row an answer
    back = score(folder, output).table.set_index("path")
    assert back.loc["c.jpg", "sha256"] == first.loc["c.jpg", "sha256"] and pd.isna(back.loc["c.jpg", "error"])


# --- 6. two runs on one output ---------------------------------------------------------------------


def test_a_second_score_on_the_same_output_is_refused_while_the_first_runs(model, tmp_path, capsys):
    folder = photos(tmp_path / "in", {"a.jpg": b"IMG a"})
    output = tmp_path / "out.parquet"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pathlib import Path; from steps.score import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)",
            str(output),
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert scoring.main(["--input", str(folder), "--output", str(output), "--model-uri", "models:/fake/1"]) == 2
        assert f"another score (process {holder.pid}) is writing {output}" in one_line_error(capsys)
        assert model.loads == [] and not output.exists() and not output.with_name("out.parquet.partial").exists()
        holder.send_signal(signal.SIGKILL)  # killed: the system lets go of the lock
        holder.wait()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert score(folder, output).summary.files == 1
    assert not output.with_name("out.parquet.lock").exists()


def test_a_run_that_fails_lets_go_of_the_lock(model, tmp_path, monkeypatch):
    folder = photos(tmp_path / "in", {"a.jpg": b"IMG a"})
    monkeypatch.setattr(scoring.Store, "write_part", lambda store, rows: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        score(folder, tmp_path / "out.parquet")
    monkeypatch.undo()
    with scoring.output_lock(tmp_path / "out.parquet"):
        assert (tmp_path / "out.parquet.lock").read_text() == str(os.getpid())


# --- 7. formulas in CSV cells ----------------------------------------------------------------------


FORMULAS = ["=HYPERLINK(evil).jpg", "+1.jpg", "-1.jpg", "@SUM(1).jpg", "\tt.jpg", "\rr.jpg", "'q.jpg"]


def test_csv_cells_that_a_spreadsheet_would_run_are_neutralised_and_parquet_keeps_the_truth(model, tmp_path):
    folder = photos(tmp_path / "in", {name: b"IMG " + name.encode() for name in [*FORMULAS, "plain.jpg"]})
    csv_output, parquet_output = tmp_path / "out.csv", tmp_path / "out.parquet"
    score(folder, csv_output)
    score(folder, parquet_output)
    with csv_output.open(newline="") as handle:
        cells = {row["path"] for row in csv.DictReader(handle)}
    assert cells == {"'" + name for name in FORMULAS} | {"plain.jpg"}
    assert set(pq.read_table(parquet_output).column("path").to_pylist()) == {*FORMULAS, "plain.jpg"}
    again = score(folder, csv_output)  # read back exactly: nothing is scored twice
    assert again.summary.scored_now == 0 and set(again.table.path) == {*FORMULAS, "plain.jpg"}


# --- 13. .zip members named outside the archive; keys with a NUL -----------------------------------


def test_a_zip_member_named_outside_the_archive_is_counted(model, tmp_path):
    with zipfile.ZipFile(tmp_path / "in.zip", "w") as archive:
        archive.writestr("ok.jpg", b"IMG ok")
        archive.writestr("../../x.jpg", b"IMG x")
        archive.writestr("/abs/y.jpg", b"IMG y")
        archive.writestr("../notes.txt", b"text")
    result = score(tmp_path / "in.zip", tmp_path / "out.parquet")
    rows = result.table.set_index("path")
    outside = "cannot read from the .zip: its name leads outside the archive"
    assert rows.loc["../../x.jpg", "error"] == rows.loc["/abs/y.jpg", "error"] == outside
    assert pd.isna(rows.loc["ok.jpg", "error"]) and result.summary.ignored == {".txt": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.zip", "out.parquet"]


def test_a_key_with_a_nul_is_refused_by_both_stores(tmp_path):
    assert safe_key("train/cat/a\0.jpg") is None
    with pytest.raises(StoreError, match="key outside the image store"):
        ObjectStore("s3://bucket/prefix").write("train/cat/a\0.jpg", b"data")  # refused before any request
    with pytest.raises(StoreError, match="key outside the image store"):
        FolderStore(tmp_path).write("train/cat/a\0.jpg", b"data")


# --- 8. extract and symlinks in the image store ----------------------------------------------------


def afhq_source(root: Path) -> Path:
    for label in ("cat", "dog"):
        photos(root / "train" / label, {f"{label}_{n}.jpg": jpeg((40 * n, 80, 120), (40, 30)) for n in range(3)})
    return root


def test_extract_refuses_a_symlinked_folder_in_the_store_and_writes_nothing_outside(tmp_path, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    store = tmp_path / "store"
    (store / "train").mkdir(parents=True)
    (store / "train" / "cat").symlink_to(outside)
    source = afhq_source(tmp_path / "src")
    assert extracting.main(["--source", str(source), "--image-store", str(store), "--metadata", str(tmp_path / "m.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("extract: error: cannot write train/cat/") and "'cat' is a link or not a folder" in err[0]
    assert list(outside.iterdir()) == [] and not (tmp_path / "m.csv").exists()


def test_extract_never_follows_a_planted_partial_link(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    store = tmp_path / "store"
    (store / "train" / "cat").mkdir(parents=True)
    (store / "train" / "cat" / ".cat_0.jpg.partial").symlink_to(victim)
    (store / "train" / "cat" / "cat_1.jpg").symlink_to(victim)  # a link at the final name: replaced, not written through
    source = afhq_source(tmp_path / "src")
    report = extracting.extract(str(source), store, tmp_path / "m.csv")
    assert report.written == 6 and victim.read_text() == "precious"
    for name in ("cat_0.jpg", "cat_1.jpg"):
        written = store / "train" / "cat" / name
        assert not written.is_symlink() and written.read_bytes() == (source / "train" / "cat" / name).read_bytes()
    assert not (store / "train" / "cat" / ".cat_0.jpg.partial").exists()


def test_extract_reads_a_lying_zip_member_within_the_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(extracting, "MAX_FILE_BYTES", 10_000)
    archive = tmp_path / "afhq.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        bundle.writestr("train/cat/good.jpg", jpeg())
        bundle.writestr("train/dog/bomb.jpg", bytes(4 * 2**20))
    info = zipfile.ZipFile(archive).getinfo("train/dog/bomb.jpg")
    raw = bytearray(archive.read_bytes())
    struct.pack_into("<I", raw, info.header_offset + 22, 1_000)  # both headers say 1,000 bytes
    struct.pack_into("<I", raw, raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 4) + 24, 1_000)
    archive.write_bytes(bytes(raw))
    inflated = []
    monkeypatch.setattr(zlib, "decompressobj", counting_decompressobj(zlib.decompressobj, inflated))
    report = extracting.extract(str(archive), tmp_path / "store", tmp_path / "m.csv")
    assert report.written == 1 and any("bomb.jpg: cannot be read (Bad CRC-32" in line for line in report.skipped)
    assert max(inflated) <= 10_001


def counting_decompressobj(original, counted: list[int]):
    """zlib.decompressobj, counting the bytes each decompressor hands out."""

    class Counting:
        def __init__(self, *args):
            self.inner = original(*args)
            counted.append(0)
            self.index = len(counted) - 1

        def decompress(self, data, max_length=0):
            out = self.inner.decompress(data, max_length)
            counted[self.index] += len(out)
            return out

        def flush(self, *args):
            out = self.inner.flush(*args)
            counted[self.index] += len(out)
            return out

        def __getattr__(self, name):
            return getattr(self.inner, name)

    return Counting


# --- 9. populate on files and rows extract does not write -----------------------------------------


@pytest.fixture
def extracted(tmp_path):
    extracting.extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=2, seed=5)
    return tmp_path / "images", tmp_path / "meta.csv", tmp_path / "catalogue.db"


def edit_first_row(metadata: Path, **changes) -> None:
    with metadata.open(newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    rows[0].update(changes)
    with metadata.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


@pytest.mark.parametrize(
    "spoil, message",
    [
        (lambda m: edit_first_row(m, attributes="x" * 200_000), "field larger than field limit (131072): not a metadata CSV"),
        (lambda m: m.write_bytes(m.read_bytes() + "café".encode("latin-1") + b"\n"), "is not UTF-8 text"),
        (lambda m: m.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8binary"), "is not UTF-8 text"),
    ],
)
def test_populate_refuses_a_file_that_is_not_a_metadata_csv_in_one_line(extracted, capsys, spoil, message):
    image_store, metadata, db = extracted
    spoil(metadata)
    assert populating.main(["--metadata", str(metadata), "--image-store", str(image_store), "--db", str(db)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"populate: error: {metadata}") and message in err[0]
    assert not db.exists()  # refused before the catalogue is touched


@pytest.mark.parametrize(
    "changes, problem",
    [
        ({"path": "train/cat/a\0b.jpg"}, "path holds a NUL byte"),
        ({"source": "synthetic\0"}, "source holds a NUL byte"),
        ({"path": "train/cat/" + "x" * 300 + ".jpg"}, "path longer than 1024 characters or with a name over 255 bytes"),
        ({"label": '=HYPERLINK("http://x")'}, "unknown label '=HYPERLINK"),
        ({"label": "<script>alert(1)</script>"}, "unknown label '<script>"),
        ({"width": "٣"}, "width must be a positive integer, not '٣'"),
        ({"height": "１２"}, "height must be a positive integer"),
    ],
)
def test_populate_rejects_rows_extract_does_not_write(extracted, changes, problem):
    image_store, metadata, db = extracted
    edit_first_row(metadata, **changes)
    report = populating.populate(metadata, image_store, db)
    assert report.inserted == 5 and len(report.rejected) == 1 and problem in report.rejected[0]
