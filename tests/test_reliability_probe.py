"""The findings of the outside probe (issue 15), each reproduced and shown fixed: a tampered catalogue,
a scoring server that answers wrong rows, wrong types or trickles, slow clients against the page
under the repository's gunicorn configuration, gunicorn's own error pages, and the memory that one
image costs to decode.

No scoring model is needed here: a fake scoring server stands in for `mlflow models serve`."""

from __future__ import annotations

import http.client
import http.server
import io
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import requests
from PIL import Image

from bench.decoding import FORMATS, measure
from pyfunc.preprocess import BYTES_PER_PIXEL
from tests.conftest import free_port, run_pipeline
from web.app import create_app
from web.security import SECURITY_HEADERS
from web.serve import page_server

ROW = {
    "label": "cat",
    "confidence": 0.9,
    "probabilities": {"cat": 0.9, "dog": 0.05, "wild": 0.05},
    "uncertain": False,
    "similar": [{"id": 1, "path": "train/cat/a.jpg", "label": "cat", "score": 0.8}],
    "error": None,
}


def png(colour=(200, 30, 30), size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "PNG")
    return buffer.getvalue()


def jpeg(colour=(30, 200, 30), size=(24, 24)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, "JPEG")
    return buffer.getvalue()


def upload(client, path: str, data: bytes):
    return client.post(path, data={"image": (io.BytesIO(data), "face.jpg")}, content_type="multipart/form-data")


# --- 1, 2: a tampered catalogue -----------------------------------------------------------------


@pytest.fixture(scope="module")
def tampered(tmp_path_factory):
    """A catalogue copy whose settings name /etc as the image store and whose rows are every odd
    thing a row can hold; returns (client, {name: id}, good ids, the store)."""
    root = tmp_path_factory.mktemp("tampered")
    store, _, db = run_pipeline(root, images_per_class=2)
    secret = root / "secret.txt"
    secret.write_text("root:x:0:0 (outside the image store)")
    cats = store / "train" / "cat"
    (cats / "inside.jpg").symlink_to(sorted(cats.glob("*.jpg"))[0])  # a link that stays in the store
    (cats / "outside.jpg").symlink_to(secret)
    (cats / "loop_a.jpg").symlink_to(cats / "loop_b.jpg")
    (cats / "loop_b.jpg").symlink_to(cats / "loop_a.jpg")
    os.mkfifo(cats / "fifo.jpg")
    (cats / "page.html").write_text("<html><script>alert(document.cookie)</script></html>")
    (cats / "picture.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><script>alert(1)</script></svg>')
    (cats / "empty.jpg").write_bytes(b"")
    (cats / "really_a_png.jpg").write_bytes(png())
    odd = {
        "etc passwd": "passwd",
        "dot-dot": "../secret.txt",
        "deep dot-dot": "train/../../secret.txt",
        "absolute": str(secret),
        "absolute /etc": "/etc/passwd",
        "backslashes": "train\\..\\..\\secret.txt",
        "NUL": "train/cat/a\x00.jpg",
        "long name": "train/cat/" + "a" * 300 + ".jpg",
        "long path": "train/" + "d/" * 3000 + "x.jpg",
        "symlink out": "train/cat/outside.jpg",
        "symlink loop": "train/cat/loop_a.jpg",
        "directory": "train/cat",
        "empty path": "",
        "FIFO": "train/cat/fifo.jpg",
        "html": "train/cat/page.html",
        "svg": "train/cat/picture.svg",
        "empty file": "train/cat/empty.jpg",
        "missing file": "train/cat/nothing.jpg",
        "BLOB": sqlite3.Binary(b"train/cat/inside.jpg"),
        "integer": 12345,
        "not UTF-8": None,  # set below: TEXT holding bytes that are not UTF-8
    }
    good = {"inside link": "train/cat/inside.jpg", "PNG named .jpg": "train/cat/really_a_png.jpg"}
    ids = {}
    with sqlite3.connect(db) as conn:
        # The probe's first step: point the catalogue's own record of the store at /etc.
        conn.execute("UPDATE settings SET value = '/etc' WHERE key = 'store_root'")
        for n, (name, path) in enumerate({**odd, **good}.items()):
            cursor = conn.execute(
                "INSERT INTO images (sha256, path, split, label, width, height, bytes, source) "
                "VALUES (?, ?, 'train', 'cat', 8, 8, 1, 'probe')",
                (f"{n:064d}", path if path is not None else "x"),
            )
            ids[name] = cursor.lastrowid
        conn.execute("UPDATE images SET path = CAST(X'747261696eff2f612e6a7067' AS TEXT) WHERE id = ?", (ids["not UTF-8"],))
    client = create_app(
        {"ANIMAL_DB": str(db), "IMAGE_STORE": str(store), "SCORING_URL": f"http://127.0.0.1:{free_port()}/invocations"}
    ).test_client()
    return client, ids, {name: ids[name] for name in good}, store, db


def test_the_catalogue_cannot_move_the_image_store(tampered):
    client, ids, _, _, _ = tampered
    for name in ("etc passwd", "absolute /etc"):
        response = client.get(f"/images/{ids[name]}")
        assert response.status_code == 404 and b"root:" not in response.data


ODD_ROWS = [
    "dot-dot",
    "deep dot-dot",
    "absolute",
    "backslashes",
    "NUL",
    "long name",
    "long path",
    "symlink out",
    "symlink loop",
    "directory",
    "empty path",
    "FIFO",
    "html",
    "svg",
    "empty file",
    "missing file",
    "BLOB",
    "integer",
    "not UTF-8",
]


@pytest.mark.parametrize("name", ODD_ROWS)
def test_every_odd_row_is_a_404_logged_once(tampered, name, caplog):
    client, ids, _, _, _ = tampered
    caplog.set_level(logging.WARNING, logger="web.app")
    for _ in range(3):
        response = client.get(f"/images/{ids[name]}")
        assert response.status_code == 404, response.data[:200]
        assert b"root:" not in response.data and b"<script>" not in response.data
        assert response.mimetype == "text/html" and "Error 404" in response.get_data(as_text=True)
    logged = [r for r in caplog.records if f"catalogue image {ids[name]} is not served" in r.getMessage()]
    assert len(logged) == 1, [r.getMessage() for r in caplog.records]


def test_good_rows_are_served_with_the_type_their_header_shows(tampered):
    client, _, good, store, _ = tampered
    link = client.get(f"/images/{good['inside link']}")
    assert link.status_code == 200 and link.mimetype == "image/jpeg"
    assert link.data == (store / "train" / "cat" / "inside.jpg").read_bytes()
    named_jpg = client.get(f"/images/{good['PNG named .jpg']}")
    assert named_jpg.status_code == 200 and named_jpg.mimetype == "image/png"  # not what the name says
    for name, value in SECURITY_HEADERS.items():
        assert named_jpg.headers[name] == value


def test_a_blob_store_root_changes_nothing(tampered, tmp_path):
    client, _, good, _, db = tampered
    copy = tmp_path / "copy.db"
    with sqlite3.connect(db) as source, sqlite3.connect(copy) as target:
        source.backup(target)
    with sqlite3.connect(copy) as conn:
        conn.execute("UPDATE settings SET value = X'00ff2f6574630a' WHERE key = 'store_root'")
    store = client.application.config["IMAGE_STORE"]
    other = create_app({"ANIMAL_DB": str(copy), "IMAGE_STORE": store}).test_client()
    assert other.get(f"/images/{good['inside link']}").status_code == 200


# --- 4, 5: a scoring server that answers wrong, or trickles ---------------------------------------


class FakeScoring(http.server.ThreadingHTTPServer):
    """A stand-in for `mlflow models serve` that sends exactly the bytes we set, at the pace we set."""

    daemon_threads = True

    def __init__(self):
        self.raw = b""
        self.pause = 0.0  # seconds between bytes: > 0 trickles the answer (status line and all)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nConnection: close\r\n\r\n\n")

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    if server.pause:
                        for byte in server.raw:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(server.pause)
                    else:
                        self.wfile.write(server.raw)
                except OSError:
                    pass  # the page gave up: what we are testing

            def log_message(self, *args) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server_port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def answer(self, body: bytes | str | dict, status: int = 200, pause: float = 0.0) -> None:
        if isinstance(body, dict):
            body = json.dumps(body)
        body = body.encode() if isinstance(body, str) else body
        self.raw = (
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode() + body
        self.pause = pause


@pytest.fixture(scope="module")
def fake():
    server = FakeScoring()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def fake_client(fake, tmp_path_factory):
    return create_app(
        {"SCORING_URL": f"{fake.url}/invocations", "SCORING_TIMEOUT": 1, "ANIMAL_DB": str(tmp_path_factory.mktemp("none") / "none.db")}
    ).test_client()


def row(**changes) -> dict:
    return {"predictions": [{**ROW, **changes}]}


WRONG = {
    "not a row": {"predictions": [{"foo": 1}]},
    "no rows": {"predictions": []},
    "two rows": {"predictions": [ROW, ROW]},
    "predictions not a list": {"predictions": "cat"},
    "row not an object": {"predictions": ["cat"]},
    "a column missing": {"predictions": [{k: v for k, v in ROW.items() if k != "uncertain"}]},
    "confidence text": row(confidence="high"),
    "confidence over 1": row(confidence=1.5),
    "confidence NaN": '{"predictions": [{"label": "cat", "confidence": NaN, "probabilities": {"cat": 1.0}, '
    '"uncertain": false, "similar": [], "error": null}]}',
    "confidence true": row(confidence=True),
    "label not a label": row(label="horse"),
    "label a number": row(label=3),
    "probabilities a list": row(probabilities=[0.9, 0.1]),
    "probabilities text values": row(probabilities={"cat": "0.9"}),
    "uncertain text": row(uncertain="no"),
    "similar text": row(similar="y"),
    "similar id text": row(similar=[{**ROW["similar"][0], "id": "1"}]),
    "similar id true": row(similar=[{**ROW["similar"][0], "id": True}]),
    "similar without score": row(similar=[{"id": 1, "path": "a", "label": "cat"}]),
    "similar too many": row(similar=ROW["similar"] * 7),  # the page asks for 6
    "error not text": row(error=5),
    "unfamiliar text": row(unfamiliar="yes"),
    "familiarity text": row(familiarity="high"),
    "not JSON": "<html>a proxy's error page</html>",
    "deeply nested": "[" * 100_000 + "]" * 100_000,
}


@pytest.mark.parametrize("case", WRONG)
@pytest.mark.parametrize("path", ["/api/predict", "/predict"])
def test_an_answer_outside_the_output_contract_is_a_502(fake, fake_client, case, path):
    fake.answer(WRONG[case])
    response = upload(fake_client, path, jpeg())
    assert response.status_code == 502, response.get_data(as_text=True)[:300]
    assert b'"foo"' not in response.data and b"Traceback" not in response.data


def test_documented_extra_columns_pass_and_undocumented_ones_are_dropped(fake, fake_client):
    fake.answer(row(unfamiliar=False, familiarity=0.73, debug="/srv/models/animal/secret"))
    answer = upload(fake_client, "/api/predict", jpeg())
    assert answer.status_code == 200
    assert answer.json == {**ROW, "unfamiliar": False, "familiarity": 0.73}
    fake.answer(row(unfamiliar=None, familiarity=None))  # a model without the detector: null
    assert upload(fake_client, "/api/predict", jpeg()).status_code == 200
    fake.answer(row())
    page = upload(fake_client, "/predict", jpeg())
    assert page.status_code == 200 and b"data-label>cat<" in page.data


def test_a_row_error_is_a_400_and_an_upstream_stack_trace_is_not_shown(fake, fake_client):
    fake.answer(
        {
            "predictions": [
                {
                    "label": None,
                    "confidence": None,
                    "probabilities": None,
                    "uncertain": None,
                    "similar": [],
                    "error": "could not decode image: broken data stream",
                }
            ]
        }
    )
    response = upload(fake_client, "/api/predict", jpeg())
    assert response.status_code == 400 and "broken data stream" in response.json["error"]
    fake.answer(
        {
            "error_code": "BAD_REQUEST",
            "message": "Failed to predict data '/srv/secret/input'",
            "stack_trace": 'Traceback (most recent call last):\n  File "/usr/lib/python3/mlflow.py"',
        },
        status=400,
    )
    response = upload(fake_client, "/predict", jpeg())
    assert response.status_code == 502 and "HTTP 400" in response.get_data(as_text=True)
    assert b"Traceback" not in response.data and b"/srv/secret" not in response.data and b"mlflow.py" not in response.data


def test_a_trickled_answer_is_cut_at_the_deadline(fake, fake_client):
    """One byte every 0.1 s: the whole answer would take over 25 s; SCORING_TIMEOUT is 1 s in all."""
    fake.answer(row(), pause=0.1)
    assert len(fake.raw) * 0.1 > 25
    started = time.monotonic()
    response = upload(fake_client, "/api/predict", jpeg())
    elapsed = time.monotonic() - started
    assert response.status_code == 503 and "did not answer within 1 s" in response.json["error"]
    assert elapsed < 10, elapsed  # the deadline, not the trickle, ended it (wide margin for a loaded machine)
    fake.answer(row())
    assert upload(fake_client, "/api/predict", jpeg()).status_code == 200  # and the page goes on


def test_an_oversized_answer_is_a_502(fake, fake_client):
    fake.answer(row(similar=[{**ROW["similar"][0], "path": "p" * 2_000_000}]))
    assert upload(fake_client, "/api/predict", jpeg()).status_code == 502


# --- 3: slow clients against the page under gunicorn.conf.py --------------------------------------


def trickle_headers(port: int, stop: threading.Event, sent: list[int]) -> None:
    """A slowloris client: a request line, then one header line every 0.5 s until told to stop."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        while not stop.wait(0.5):
            sock.sendall(b"X-Slow: 1\r\n")
            sent.append(1)


def raw(port: int, request: bytes, timeout: float = 30) -> http.client.HTTPResponse:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(request)
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response


@pytest.fixture(scope="module")
def gunicorn_page(fake, tmp_path_factory):
    log = tmp_path_factory.mktemp("gunicorn") / "page.log"
    with page_server(fake.url, log=log, UPLOAD_IDLE_TIMEOUT=2, SCORING_TIMEOUT=5) as page:
        yield page


def test_slow_clients_do_not_stop_the_page(fake, gunicorn_page):
    fake.answer(row())
    port = int(gunicorn_page.url.rsplit(":", 1)[1])
    stop, sent = threading.Event(), [[], []]
    slow = [threading.Thread(target=trickle_headers, args=(port, stop, s), daemon=True) for s in sent]
    for thread in slow:
        thread.start()
    # A third: declares 100,000 bytes of upload and sends 6.
    stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
    stalled.sendall(
        b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\nContent-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\n"
    )
    try:
        time.sleep(1.5)
        with requests.Session() as session:
            for _ in range(3):
                assert session.get(f"{gunicorn_page.url}/healthz", timeout=10).json()["ok"] is True
                answer = session.post(f"{gunicorn_page.url}/api/predict", files={"image": ("a.jpg", jpeg())}, timeout=10)
                assert answer.status_code == 200 and answer.json()["label"] == "cat"
        assert all(thread.is_alive() for thread in slow) and all(sent)  # they were still trickling meanwhile
        # The stalled upload is ended by the page after UPLOAD_IDLE_TIMEOUT (2 s), with its headers.
        response = http.client.HTTPResponse(stalled)
        response.begin()
        assert response.status == 408
        assert all(response.getheader(name) == value for name, value in SECURITY_HEADERS.items())
    finally:
        stop.set()
        stalled.close()
        for thread in slow:
            thread.join(timeout=10)


@pytest.mark.parametrize(
    "request_bytes, status",
    [
        (b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # over limit_request_line
        (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(60)) + b"\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 9000 + b"\r\n\r\n", 431),  # over limit_request_field_size
        (b"NOT<script>A REQUEST\r\n\r\n", 400),
    ],
)
def test_gunicorns_own_errors_carry_the_headers_and_echo_nothing(gunicorn_page, request_bytes, status):
    port = int(gunicorn_page.url.rsplit(":", 1)[1])
    response = raw(port, request_bytes)
    body = response.read()
    assert response.status == status
    for name, value in SECURITY_HEADERS.items():
        assert response.getheader(name) == value
    assert b"aaaa" not in body and b"bbbb" not in body and b"<script>" not in body and b"X-59" not in body


# --- 7: the memory one image costs ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["16-bit grey PNG", "palette + alpha PNG", "RGBA PNG", "EXIF-rotated RGBA PNG", "CMYK JPEG"])
def test_decoding_stays_within_the_bound(name):
    """Measured in a fresh process (peak resident memory); 6 MP here, 40 MP in bench/decoding.py."""
    assert name in FORMATS
    (result,) = measure(6, [name])
    pixels = result["width"] * result["height"]
    allowance = 8 * 2**20  # the file itself, the decoder's buffers, numpy's result
    assert result["peak_bytes"] <= BYTES_PER_PIXEL * pixels + allowance, result


def test_store_for_issue_12_plugs_in_by_location(tmp_path):
    from web.store import BucketStore, LocalStore, open_store

    assert isinstance(open_store(tmp_path), LocalStore)
    assert isinstance(open_store("s3://bucket/prefix"), BucketStore)  # issue 12 plugged in (tests/test_team.py)
    with pytest.raises(ValueError, match="a folder or s3://"):
        open_store("ftp://host/images")
    assert Path(open_store(tmp_path).root) == tmp_path.resolve()
