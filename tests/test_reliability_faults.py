"""Faults: damaged sources, repeated and concurrent catalogue writes, a training run killed midway,
a scoring server that is down or slow, and requests that only a real HTTP server sees. Nothing is
lost, nothing is reached that should not be, and everything recovers.

test_extract.py and test_populate.py cover the plain cases (empty folder, wrong layout, a bad file
among good ones in a folder, re-runs, a missing file); this file adds the rest."""

from __future__ import annotations

import hashlib
import http.client
import http.server
import io
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pytest
import requests
from mlflow import MlflowClient
from PIL import Image
from werkzeug.serving import make_server

from databases import catalogue
from steps.extract import SourceError, extract
from steps.populate import populate
from tests.conftest import ROOT, free_port, run_pipeline
from web.app import create_app


def jpeg(colour=(120, 80, 40), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def read_rows(db: Path) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM images ORDER BY id").fetchall()


# --- extract ------------------------------------------------------------------------------------


def zip_with_corrupt_entries(path: Path, corrupt: set[str]) -> None:
    """A .zip of good JPEGs in the AFHQ layout, some of whose entries are damaged inside the archive
    (a flipped byte in the stored data: a bad CRC when read)."""
    entries = {
        f"afhq/{split}/{label}/img_{n}.jpg": jpeg((60 * i, 30 * n, 90 + 40 * (split == "val")))
        for split in ("train", "val")
        for i, label in enumerate(("cat", "dog", "wild"))
        for n in range(2)
    }
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        for info in archive.infolist():
            if info.filename in corrupt:
                data_start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                raw[data_start + info.compress_size // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_corrupt_zip_entries_are_skipped_and_counted(tmp_path):
    archive = tmp_path / "afhq.zip"
    damaged = {"afhq/train/cat/img_1.jpg", "afhq/val/wild/img_0.jpg"}
    zip_with_corrupt_entries(archive, damaged)
    report = extract(str(archive), tmp_path / "images", tmp_path / "meta.csv")
    assert report.written == 10 and len(report.skipped) == 2
    assert all("cannot be read" in s for s in report.skipped)
    assert {s.split(":")[0] for s in report.skipped} == damaged
    assert len(list((tmp_path / "images").rglob("*.jpg"))) == 10
    assert populate(tmp_path / "meta.csv", tmp_path / "images", tmp_path / "c.db").inserted == 10


def test_only_corrupt_files_is_one_clear_error(tmp_path):
    for split in ("train", "val"):
        folder = tmp_path / "src" / split / "dog"
        folder.mkdir(parents=True)
        (folder / "cut.jpg").write_bytes(jpeg()[:200])
        (folder / "text.jpg").write_text("not a picture")
    with pytest.raises(SourceError, match=r"no usable images .*\(4 skipped\)"):
        extract(str(tmp_path / "src"), tmp_path / "images", tmp_path / "meta.csv")
    assert not (tmp_path / "meta.csv").exists()


def test_truncated_zip_archive_is_one_clear_error(tmp_path):
    archive = tmp_path / "afhq.zip"
    zip_with_corrupt_entries(archive, set())
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])  # a download cut short
    with pytest.raises(SourceError, match="neither a folder nor a .zip"):
        extract(str(archive), tmp_path / "images", tmp_path / "meta.csv")


def test_hostile_names_in_a_zip_stay_in_the_store_and_are_data(tmp_path):
    names = [
        "train/cat/..\\..\\..\\evil.jpg",
        "train/cat/a\\..\\..\\evil.jpg",
        "/train/dog/absolute.jpg",
        "train/cat/../../../../escape.jpg",
        'train/wild/it\'s "quoted"; DROP TABLE images;--.jpg',
        "val/cat/%2e%2e%2fencoded.jpg",
        "val/dog/\u00e9t\u00e9 \U0001f431.JPG",
        "val/wild/plain.jpg",
        "train/cat/..",
        "train/cat/.hidden.jpg",
    ]
    archive = tmp_path / "hostile.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for n, name in enumerate(names):
            zf.writestr(name, jpeg((20 * n, 100, 200 - 20 * n)))
    store = tmp_path / "store" / "images"
    report = extract(str(archive), store, tmp_path / "meta.csv")
    files = [f for f in tmp_path.rglob("*") if f.is_file()]
    assert {f.parent.resolve() for f in files if f.suffix.lower() == ".jpg"} <= {
        (store / s / label).resolve() for s in ("train", "val") for label in ("cat", "dog", "wild")
    }
    # outside the layout: '../../../..' (too deep), and names starting with a dot ('..', '..\\..', '.hidden')
    assert report.written == 6 and report.ignored == 4
    populated = populate(tmp_path / "meta.csv", store, tmp_path / "c.db")
    assert populated.inserted == 6 and not populated.rejected
    conn = catalogue.connect(tmp_path / "c.db", readonly=True)
    try:
        paths = catalogue.images(conn).path.tolist()
        assert len(paths) == 6 and all(set(p) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-") for p in paths)
        for image_id in catalogue.images(conn).id:
            assert catalogue.image_file(conn, int(image_id)).is_relative_to(store.resolve())
    finally:
        conn.close()


# --- populate -----------------------------------------------------------------------------------


def test_the_same_photo_under_two_names_is_one_row_and_reruns_change_nothing(tmp_path):
    for split, colour in (("train", (200, 10, 10)), ("val", (10, 10, 200))):
        folder = tmp_path / "src" / split / "cat"
        folder.mkdir(parents=True)
        (folder / "a.jpg").write_bytes(jpeg(colour))
        (folder / "copy_of_a.jpg").write_bytes(jpeg(colour))
    extract(str(tmp_path / "src"), tmp_path / "images", tmp_path / "meta.csv")
    db = tmp_path / "c.db"
    first = populate(tmp_path / "meta.csv", tmp_path / "images", db)
    assert (first.inserted, first.updated) == (2, 0)
    assert len(first.rejected) == 2 and all("same content as" in r for r in first.rejected)
    before = read_rows(db)
    second = populate(tmp_path / "meta.csv", tmp_path / "images", db)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 2)
    assert read_rows(db) == before


@pytest.mark.parametrize("column, value", [("width", "abc"), ("height", "0"), ("bytes", "-5"), ("width", "1.5")])
def test_a_row_with_a_bad_number_is_reported_not_fatal(pipeline, tmp_path, column, value):
    import csv

    with pipeline.metadata.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[3][column] = value
    metadata = tmp_path / "meta.csv"
    with metadata.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = populate(metadata, pipeline.image_store, tmp_path / "c.db")
    assert report.inserted == len(rows) - 1
    assert len(report.rejected) == 1 and f"{column} must be a positive integer" in report.rejected[0]


# --- a training run killed midway ---------------------------------------------------------------


def test_training_killed_midway_leaves_the_registry_alone_and_reruns(pipeline, tmp_path):
    """`python -m steps.train` with its own tracking store, which already has a Production model, is
    killed with SIGKILL while fitting: same versions, same stage, same alias; a re-run completes."""
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store)
    experiment = client.create_experiment("killed", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model("animal")
    source = mlflow.get_logged_model(pipeline.model_uri.removeprefix("models:/")).artifact_location
    version = client.create_model_version("animal", source)
    client.transition_model_version_stage("animal", version.version, "Production")
    client.set_registered_model_alias("animal", "production", version.version)

    def registry() -> tuple:
        versions = sorted((v.version, v.current_stage, v.source) for v in client.search_model_versions("name='animal'"))
        return versions, client.get_model_version_by_alias("animal", "production").version

    before, catalogue_bytes = registry(), pipeline.db.read_bytes()
    env = {**os.environ, "MLFLOW_TRACKING_URI": store, "MLFLOW_EXPERIMENT_ID": experiment, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [
        sys.executable,
        "-m",
        "steps.train",
        "--db",
        str(pipeline.db),
        "--image-size",
        "16",
        "--conv-blocks",
        "1",
        "--filters",
        "4",
        "--dense-units",
        "8",
        "--batch-size",
        "8",
    ]
    process = subprocess.Popen(
        command + ["--epochs", "1000", "--patience", "1000"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    fitting = threading.Event()
    output: list[str] = []

    def watch() -> None:
        for line in process.stdout:
            output.append(line)
            if line.startswith("Epoch 3/"):
                fitting.set()

    threading.Thread(target=watch, daemon=True).start()
    try:
        assert fitting.wait(timeout=180), "training never reached its third epoch:\n" + "".join(output[-30:])
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL

    assert registry() == before
    assert pipeline.db.read_bytes() == catalogue_bytes  # training only ever reads the catalogue
    (killed,) = client.search_runs([experiment])
    assert killed.info.status == "RUNNING" and "model_uri" not in killed.data.tags  # no model logged
    assert "loss" in killed.data.metrics  # it was killed while fitting, after epochs had been logged

    rerun = subprocess.run(command + ["--epochs", "1"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "validation accuracy" in rerun.stdout
    finished = [r for r in client.search_runs([experiment]) if r.info.status == "FINISHED"]
    assert len(finished) == 1 and finished[0].data.tags["model_uri"].startswith("models:/")
    assert registry() == before  # training alone never touches the registry: only the gate does


# --- a live page (a real HTTP server on loopback) -----------------------------------------------


@contextmanager
def live_page(config: dict):
    """The page served by werkzeug's threaded server on a free loopback port; yields its base URL."""
    server = make_server("127.0.0.1", 0, create_app(config), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


def raw_request(base: str, request: bytes, timeout: float = 30) -> tuple[int, bytes]:
    """Bytes on the wire, exactly as written (no client normalises the path first); (status, body)."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read()


@pytest.fixture(scope="module")
def page_url(pipeline):
    with live_page(
        {
            "ANIMAL_DB": str(pipeline.db),
            "IMAGE_STORE": str(pipeline.image_store),
            "SCORING_URL": f"http://127.0.0.1:{free_port()}/invocations",
        }
    ) as url:
        yield url


@pytest.mark.parametrize(
    "target",
    [
        "/images/../../etc/passwd",
        "/images/..%2f..%2fetc%2fpasswd",
        "/images/%2e%2e/%2e%2e/etc/passwd",
        "/images/1/../../../../etc/passwd",
        "/static/../../../../../etc/passwd",
        "/static/..%2f..%2f..%2fetc%2fpasswd",
        "/static/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/../../../../etc/passwd",
        "//etc/passwd",
        "/images/99999999999999999999",
        "/static/../web/app.py",
        "/static/..%2fapp.py",
    ],
)
def test_traversal_on_the_wire_reaches_nothing(page_url, target):
    status, answer = raw_request(page_url, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    assert status in (400, 404), answer[:300]
    assert b"root:" not in answer and b"create_app" not in answer and b"Traceback" not in answer


def test_chunked_upload_over_the_limit_is_413_and_under_it_is_answered(pipeline, scoring_server):
    photo = next(pipeline.image_store.glob("val/dog/*.jpg")).read_bytes()

    def chunked(path: str, payload: bytes) -> bytes:
        body = (
            b'--B\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n'
            b"Content-Type: image/jpeg\r\n\r\n" + payload + b"\r\n--B--\r\n"
        )
        chunks = b"".join(b"%x\r\n%s\r\n" % (len(body[i : i + 65536]), body[i : i + 65536]) for i in range(0, len(body), 65536))
        return (
            (
                f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n"
                "Content-Type: multipart/form-data; boundary=B\r\n\r\n"
            ).encode()
            + chunks
            + b"0\r\n\r\n"
        )

    config = {"ANIMAL_DB": str(pipeline.db), "SCORING_URL": f"{scoring_server}/invocations", "MAX_UPLOAD_MB": 1}
    with live_page(config) as url:
        # No Content-Length: the limit must hold on the stream itself.
        over = raw_request(url, chunked("/api/predict", photo + bytes(2 * 1024 * 1024)))
        under = raw_request(url, chunked("/api/predict", photo))
    assert over[0] == 413 and b"limited to 1 MB" in over[1], over
    assert under[0] == 200, under
    assert json.loads(under[1])["label"] in ("cat", "dog", "wild")


def test_page_never_creates_or_writes_the_catalogue(pipeline, tmp_path):
    """Readers open the catalogue read-only: a wrong ANIMAL_DB is a 503, not a new empty database."""
    missing = tmp_path / "nowhere" / "animal.db"
    client = create_app({"ANIMAL_DB": str(missing)}).test_client()
    assert client.get("/images/1").status_code == 503
    assert not missing.exists() and not missing.parent.exists()
    before = pipeline.db.read_bytes()
    client = create_app({"ANIMAL_DB": str(pipeline.db), "IMAGE_STORE": str(pipeline.image_store)}).test_client()
    assert all(client.get(f"/images/{i}").status_code == 200 for i in range(1, 6))
    assert pipeline.db.read_bytes() == before


def test_tampered_rows_and_symlinks_never_leave_the_store(tmp_path):
    image_store, _, db = run_pipeline(tmp_path, images_per_class=2)
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 (outside the image store)")
    link = image_store / "train" / "cat" / "link.jpg"
    link.symlink_to(secret)
    with sqlite3.connect(db) as conn:
        for image_id, path in ((1, "../secret.txt"), (2, str(secret)), (3, "train/cat/link.jpg"), (4, "train/../../secret.txt")):
            conn.execute("UPDATE images SET path = ? WHERE id = ?", (path, image_id))
    client = create_app({"ANIMAL_DB": str(db), "IMAGE_STORE": str(image_store)}).test_client()
    for image_id in (1, 2, 3, 4):
        response = client.get(f"/images/{image_id}")
        assert response.status_code == 404 and b"root:" not in response.data
    assert client.get("/images/5").status_code == 200


# --- the catalogue written while the page reads it ----------------------------------------------


def test_reads_succeed_while_the_catalogue_is_written(pipeline, tmp_path):
    """A writer re-runs populate, adds rows and holds one long write transaction (a big import)
    while 8 clients read /images/<id>: every read succeeds, with the right bytes. WAL makes this
    work: in the old rollback-journal mode readers wait for the writer and give up after 5 s."""
    db = tmp_path / "catalogue.db"
    with sqlite3.connect(pipeline.db) as source, sqlite3.connect(db) as copy:
        source.backup(copy)
    conn = catalogue.connect(db, readonly=True)
    try:
        expected = {int(row.id): Path(row.file).read_bytes() for row in catalogue.images(conn).itertuples()}
    finally:
        conn.close()
    done = threading.Event()
    long_write = {}
    failures: list[str] = []

    def writer() -> None:
        try:
            rng = random.Random(0)
            some_file = next(iter(expected.values()))
            for round_ in range(3):
                populate(pipeline.metadata, pipeline.image_store, db)  # a re-run: changes nothing
                conn = catalogue.connect(db)
                try:
                    rows = [
                        {
                            "sha256": hashlib.sha256(rng.randbytes(16)).hexdigest(),
                            "path": f"train/cat/new_{round_}_{i}.jpg",
                            "split": "train",
                            "label": "cat",
                            "width": 64,
                            "height": 64,
                            "bytes": len(some_file),
                            "source": "concurrent",
                            "attributes": {},
                        }
                        for i in range(200)
                    ]
                    catalogue.upsert_images(conn, rows)
                    if round_ == 1:  # one import that holds its write lock for longer than a reader waits
                        conn.isolation_level = None
                        conn.execute("BEGIN EXCLUSIVE")
                        long_write["start"] = time.monotonic()
                        conn.execute("UPDATE images SET attributes = attributes WHERE source = 'concurrent'")
                        time.sleep(6)
                        conn.execute("COMMIT")
                        long_write["end"] = time.monotonic()
                finally:
                    conn.close()
        except Exception as error:
            failures.append(f"writer: {error!r}")
        finally:
            done.set()

    reads: list[tuple[float, float, int]] = []  # (start, end, status)

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        with requests.Session() as session:
            while not done.is_set():
                image_id = rng.choice(list(expected))
                started = time.monotonic()
                response = session.get(f"{url}/images/{image_id}", timeout=30)
                reads.append((started, time.monotonic(), response.status_code))
                if response.status_code != 200 or response.content != expected[image_id]:
                    failures.append(f"/images/{image_id}: HTTP {response.status_code}")

    with live_page(
        {"ANIMAL_DB": str(db), "IMAGE_STORE": str(pipeline.image_store), "SCORING_URL": f"http://127.0.0.1:{free_port()}/invocations"}
    ) as url:
        threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
    assert not failures, failures[:5]
    assert len(read_rows(db)) == len(expected) + 600
    during = [r for r in reads if long_write["start"] < r[0] and r[1] < long_write["end"]]
    assert len(reads) >= 200 and len(during) >= 20, (len(reads), len(during))


# --- the scoring server down, slow or broken ----------------------------------------------------

ROW = {
    "label": "cat",
    "confidence": 0.9,
    "probabilities": {"cat": 0.9, "dog": 0.05, "wild": 0.05},
    "uncertain": False,
    "similar": [],
    "error": None,
}


class FakeScoring(http.server.ThreadingHTTPServer):
    """A stand-in for `mlflow models serve` that we control: how long it takes, what it answers."""

    daemon_threads = True
    delay = 0.0
    status = 200
    body = json.dumps({"predictions": [ROW]}).encode()

    def __init__(self, port: int):
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self._answer(200, b"\n")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(server.delay)
                self._answer(server.status, server.body)

            def _answer(self, status: int, body: bytes) -> None:
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass  # the client gave up waiting

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


def test_scoring_server_down_slow_or_broken_is_503_and_the_page_recovers(pipeline):
    port = free_port()
    client = create_app(
        {"SCORING_URL": f"http://127.0.0.1:{port}/invocations", "ANIMAL_DB": str(pipeline.db), "SCORING_TIMEOUT": 1}
    ).test_client()
    photo = next(pipeline.image_store.glob("val/cat/*.jpg")).read_bytes()

    def ask():
        started = time.monotonic()
        response = client.post("/api/predict", data={"image": (io.BytesIO(photo), "a.jpg")}, content_type="multipart/form-data")
        return response.status_code, response.json, time.monotonic() - started

    fake = FakeScoring(port)
    try:
        status, body, _ = ask()
        assert status == 200 and body == ROW

        fake.delay = 4  # slow: the page gives up after SCORING_TIMEOUT, not after the server
        status, body, elapsed = ask()
        assert status == 503 and "did not answer within 1 s" in body["error"] and elapsed < 3

        fake.delay = 0  # quick again: answered again, by the same page
        assert ask()[:2] == (200, ROW)

        fake.status, fake.body = 500, b'{"error_code": "INTERNAL_ERROR"}'
        status, body, _ = ask()
        assert status == 503 and "failed (HTTP 500)" in body["error"]
        fake.status, fake.body = 200, b"<html>a proxy's error page</html>"
        status, body, _ = ask()
        assert status == 502 and "not one prediction row" in body["error"]
        fake.body = json.dumps({"predictions": [ROW]}).encode()
    finally:
        fake.stop()

    status, body, elapsed = ask()  # down: refused at once
    assert status == 503 and "cannot be reached" in body["error"] and elapsed < 3
    assert client.get("/healthz").status_code == 503

    fake = FakeScoring(port)  # back on the same address: the page answers again, nothing to restart
    try:
        assert ask()[:2] == (200, ROW)
        assert client.get("/healthz").status_code == 200
    finally:
        fake.stop()
