"""The upload page against a real scoring server (`mlflow models serve` of the tiny pipeline's
Production model), through Flask's test client: every route, every error page."""

from __future__ import annotations

import base64
import io
import socket
import struct
import time
import zlib

import numpy as np
import pytest
import requests
from PIL import Image

from databases import catalogue
from pyfunc.model import OUTPUT_COLUMNS
from tests.conftest import free_port
from web.app import create_app

LABELS = {"cat", "dog", "wild"}


@pytest.fixture(scope="module")
def config(pipeline, scoring_server) -> dict:
    return {"SCORING_URL": f"{scoring_server}/invocations", "ANIMAL_DB": str(pipeline.db), "IMAGE_STORE": str(pipeline.image_store)}


@pytest.fixture(scope="module")
def client(config):
    return create_app(config).test_client()


@pytest.fixture(scope="module")
def down_client(pipeline):
    """The page with nothing listening at SCORING_URL."""
    return create_app(
        {
            "SCORING_URL": f"http://127.0.0.1:{free_port()}/invocations",
            "ANIMAL_DB": str(pipeline.db),
            "IMAGE_STORE": str(pipeline.image_store),
        }
    ).test_client()


@pytest.fixture(scope="module")
def photo(pipeline) -> bytes:
    """A validation image of the catalogue (a JPEG file)."""
    conn = catalogue.connect(pipeline.db, readonly=True)
    try:
        return open(catalogue.images(conn, split="val").file.iloc[0], "rb").read()
    finally:
        conn.close()


def upload(client, path: str, data: bytes, filename: str = "face.jpg"):
    return client.post(path, data={"image": (io.BytesIO(data), filename)}, content_type="multipart/form-data")


def direct(scoring_server: str, data: bytes, k: int) -> dict:
    """What the scoring server itself answers for this image, to compare the page with."""
    payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(data).decode()]]}, "params": {"k": k}}
    response = requests.post(f"{scoring_server}/invocations", json=payload, timeout=30)
    response.raise_for_status()
    return response.json()["predictions"][0]


def png(width: int, height: int, seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    data = bytearray(png(4, 4))
    ihdr = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:33] = ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return bytes(data)


def assert_error_page(response, status: int, *phrases: str) -> None:
    """A readable HTML page (or JSON under /api) with the status and its message, no stack trace."""
    assert response.status_code == status
    text = response.get_data(as_text=True)
    if response.request.path.startswith("/api/"):
        assert response.is_json and response.json["status"] == status, text
        text = response.json["error"]
    else:
        assert response.mimetype == "text/html"
        assert f"Error {status}" in text and 'href="/"' in text
    for phrase in phrases:
        assert phrase in text, text
    assert "Traceback" not in text and 'File "' not in text


# --- the page and its result ---------------------------------------------------------------------


def test_index_has_the_upload_form(client):
    response = client.get("/")
    html = response.get_data(as_text=True)
    assert response.status_code == 200
    assert 'action="/predict"' in html and 'enctype="multipart/form-data"' in html
    assert 'name="image" type="file"' in html and 'accept="image/jpeg' in html
    assert "up to 10&nbsp;MB" in html and f'data-max-bytes="{10 * 1024 * 1024}"' in html
    assert "img-src 'self' data:" in response.headers["Content-Security-Policy"]
    for asset, mimetype in [("style.css", "text/css"), ("upload.js", "text/javascript"), ("icon.svg", "image/svg+xml")]:
        assert f"/static/{asset}" in html
        served = client.get(f"/static/{asset}")
        assert served.status_code == 200 and served.mimetype == mimetype and served.data


def test_upload_shows_label_probabilities_and_similar_images(client, photo, scoring_server):
    expected = direct(scoring_server, photo, k=6)
    response = upload(client, "/predict", photo, "my <cat>.jpg")
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and response.mimetype == "text/html"
    assert f"data-label>{expected['label']}</h1>" in html
    assert f"{expected['confidence'] * 100:.1f}%" in html
    for name, p in expected["probabilities"].items():
        assert f'<progress max="1" value="{p}" aria-label="{name}">' in html
    # The uploaded image comes back inline, never stored; the file name is escaped.
    assert f'src="data:image/jpeg;base64,{base64.b64encode(photo).decode()}"' in html
    assert "my &lt;cat&gt;.jpg" in html and "my <cat>" not in html
    # Every similar image, in the model's order, through /images/<id>.
    assert 0 < len(expected["similar"]) <= 6
    positions = [html.index(f'<img src="/images/{item["id"]}"') for item in expected["similar"]]
    assert positions == sorted(positions)
    for item in expected["similar"]:
        assert f"{item['score']:.3f}" in html
    assert html.count('class="tile"') == len(expected["similar"])


@pytest.mark.parametrize("threshold, noted", [(1.0, True), (0.0, False)])
def test_uncertain_note(config, photo, threshold, noted):
    client = create_app({**config, "THRESHOLD": threshold}).test_client()
    html = upload(client, "/predict", photo).get_data(as_text=True)
    assert ("data-uncertain" in html) is noted
    assert ("The model is not sure" in html) is noted


def test_api_predict_returns_the_model_row(client, photo, scoring_server):
    response = upload(client, "/api/predict", photo)
    row = response.json
    assert response.status_code == 200 and response.is_json
    assert list(row) == OUTPUT_COLUMNS  # the contract's columns, in its order
    assert row["label"] in LABELS and row["error"] is None
    assert set(row["probabilities"]) == LABELS
    assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-4)
    assert row["confidence"] == max(row["probabilities"].values()) == row["probabilities"][row["label"]]
    assert row["uncertain"] == (row["confidence"] < 0.6)
    assert 0 < len(row["similar"]) <= 6
    assert all(set(item) == {"id", "path", "label", "score"} and item["label"] == row["label"] for item in row["similar"])
    scores = [item["score"] for item in row["similar"]]
    assert scores == sorted(scores, reverse=True)
    assert row == direct(scoring_server, photo, k=6)


# --- catalogue images ---------------------------------------------------------------------------


def test_catalogue_images_are_served_by_id(client, photo, pipeline):
    similar = upload(client, "/api/predict", photo).json["similar"]
    conn = catalogue.connect(pipeline.db, readonly=True)
    try:
        files = {item["id"]: catalogue.image_file(conn, item["id"]) for item in similar}
        assert catalogue.store_root(conn) == pipeline.image_store.resolve()
    finally:
        conn.close()
    for image_id, file in files.items():
        response = client.get(f"/images/{image_id}")
        assert response.status_code == 200
        assert response.data == file.read_bytes()
        assert response.mimetype == "image/jpeg"
        assert "max-age=86400" in response.headers["Cache-Control"]
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        # Browsers revalidate with the ETag and get no body back.
        again = client.get(f"/images/{image_id}", headers={"If-None-Match": response.headers["ETag"]})
        assert again.status_code == 304 and not again.data


@pytest.mark.parametrize(
    "path",
    [
        "/images/999999",
        "/images/0",
        "/images/-1",
        "/images/abc",
        "/images/1.5",
        "/images/",
        "/images/../../etc/passwd",
        "/images/..%2F..%2Fetc%2Fpasswd",
        "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        "/images/%252e%252e%252fetc%252fpasswd",
        "/images/1/../../../etc/passwd",
        "/images/1%2F..%2F..%2Fetc%2Fpasswd",
        "/images/..\\..\\etc\\passwd",
        "/images/%00",
        "/images/1%00.jpg",
    ],
)
def test_only_catalogue_ids_are_served(client, path):
    response = client.get(path)
    assert_error_page(response, 404, "Not Found")
    assert b"root:" not in response.data


def test_missing_catalogue_is_a_503_page(config):
    client = create_app({**config, "ANIMAL_DB": "/nonexistent/animal.db"}).test_client()
    assert_error_page(client.get("/images/1"), 503, "catalogue is not available")


# --- errors -------------------------------------------------------------------------------------


def truncated_png(photo: bytes) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(buffer, "PNG")
    return buffer.getvalue()[: buffer.tell() // 2]


def tiff() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "TIFF")
    return buffer.getvalue()


BAD_UPLOADS = {  # checked by the page itself, before the scoring server is asked
    "empty": (b"", "the file is empty"),
    "text": (b"hello, world\n", "not an image"),
    "tiff": (tiff(), "unsupported image format TIFF"),
    "too many pixels": (png_claiming(7000, 7000), "image too large: 7000x7000 pixels"),
    "bomb": (png_claiming(100_000, 100_000), "image too large"),
}


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
@pytest.mark.parametrize("case", BAD_UPLOADS)
def test_bad_uploads_are_400_without_asking_the_model(down_client, path, case):
    data, message = BAD_UPLOADS[case]
    # down_client has no scoring server: a 400 (not a 503) shows the model was never asked.
    assert_error_page(upload(down_client, path, data), 400, message)


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_missing_field_is_400(client, path):
    response = client.post(path, data={"photo": (io.BytesIO(b"x"), "x.jpg")}, content_type="multipart/form-data")
    assert_error_page(response, 400, "No file was sent", "form field")
    assert_error_page(client.post(path), 400, "No file was sent")


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_image_the_model_cannot_read_is_400(client, photo, path):
    # The header is a fine PNG, the pixels are cut off: only the model finds out, in its row's `error`.
    assert_error_page(upload(client, path, truncated_png(photo), "cut.png"), 400, "could not decode image")


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_too_large_upload_is_413(config, path):
    client = create_app({**config, "MAX_UPLOAD_MB": 0.05}).test_client()
    big = png(256, 256)
    assert len(big) > 0.05 * 1024 * 1024
    assert_error_page(upload(client, path, big, "big.png"), 413, "too large", "0.05 MB")
    assert "up to 0.05&nbsp;MB" in client.get("/").get_data(as_text=True)


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_scoring_server_down_is_503(down_client, photo, path):
    assert_error_page(upload(down_client, path, photo), 503, "not answering", "cannot be reached")


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_scoring_server_answering_no_prediction_is_502(config, photo, scoring_server, path):
    client = create_app({**config, "SCORING_URL": f"{scoring_server}/no-such-route"}).test_client()
    assert_error_page(upload(client, path, photo), 502, "no usable answer", "HTTP 404")


def test_scoring_server_too_slow_is_503(pipeline, photo):
    # A socket that accepts connections (the kernel's backlog) but never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        client = create_app(
            {
                "SCORING_URL": f"http://127.0.0.1:{silent.getsockname()[1]}/invocations",
                "ANIMAL_DB": str(pipeline.db),
                "SCORING_TIMEOUT": 0.5,
            }
        ).test_client()
        started = time.monotonic()
        response = upload(client, "/predict", photo)
    assert_error_page(response, 503, "did not answer within 0.5 s")
    assert time.monotonic() - started < 5


def test_uploads_never_touch_the_disk(down_client, monkeypatch):
    import werkzeug.formparser

    def no_disk(*args, **kwargs):
        raise AssertionError("an upload was written to a temporary file")

    monkeypatch.setattr(werkzeug.formparser, "SpooledTemporaryFile", no_disk, raising=False)
    monkeypatch.setattr(werkzeug.formparser, "TemporaryFile", no_disk, raising=False)
    # 3 MB: werkzeug would spool it to disk (its limit is 500 KB); the page keeps it in memory.
    response = upload(down_client, "/api/predict", png_claiming(8, 8) + bytes(3 * 1024 * 1024), "big.png")
    assert response.status_code == 503  # read, checked, sent on: the model is down in this client


def test_healthz_says_whether_things_work_not_where(client, down_client, config):
    up = client.get("/healthz")
    assert up.status_code == 200
    assert up.json == {"ok": True, "scoring_server": {"answers": True}, "catalogue": {"readable": True}}
    down = down_client.get("/healthz")
    assert down.status_code == 503
    assert down.json == {"ok": False, "scoring_server": {"answers": False}, "catalogue": {"readable": True}}
    missing = create_app({**config, "ANIMAL_DB": "/nonexistent/animal.db"}).test_client().get("/healthz")
    assert missing.json["catalogue"] == {"readable": False}
    for answer in (up, down, missing):  # no path, no address, no port
        text = answer.get_data(as_text=True)
        assert "/" not in text and "127.0.0.1" not in text and "animal.db" not in text, text


def test_wrong_method_and_unknown_route(client):
    assert_error_page(client.get("/predict"), 405, "Method Not Allowed")
    assert_error_page(client.get("/api/predict"), 405, "not allowed")
    assert_error_page(client.get("/nowhere"), 404, "Not Found")


def test_unexpected_error_shows_no_stack_trace(config):
    app = create_app(config)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret internal detail")

    response = app.test_client().get("/boom")
    assert_error_page(response, 500, "Something went wrong")
    assert b"secret internal detail" not in response.data and b"RuntimeError" not in response.data


def test_configuration_from_the_environment(monkeypatch):
    monkeypatch.setenv("SCORING_URL", "http://scoring.example:9000/invocations")
    monkeypatch.setenv("ANIMAL_DB", "/srv/animal.db")
    monkeypatch.setenv("MAX_UPLOAD_MB", "3")
    monkeypatch.setenv("SCORING_TIMEOUT", "7")
    monkeypatch.setenv("IMAGE_STORE", "/srv/images")
    app = create_app()
    assert app.config["IMAGE_STORE"] == "/srv/images"
    assert app.config["SCORING_URL"] == "http://scoring.example:9000/invocations"
    assert app.config["ANIMAL_DB"] == "/srv/animal.db"
    assert app.config["MAX_CONTENT_LENGTH"] == 3 * 1024 * 1024
    assert app.config["SCORING_TIMEOUT"] == 7.0
    # Explicit configuration wins over the environment.
    assert create_app({"MAX_UPLOAD_MB": 1}).config["MAX_CONTENT_LENGTH"] == 1024 * 1024


@pytest.mark.parametrize("setting", [{"SIMILAR_K": 101}, {"SIMILAR_K": -1}, {"THRESHOLD": 1.5}])
def test_out_of_range_configuration_fails_at_start(setting):
    with pytest.raises(ValueError, match=next(iter(setting))):
        create_app(setting)


def test_module_level_app_uses_the_defaults():
    from web.app import app

    assert app.config["SCORING_URL"].endswith("/invocations")
    assert {rule.rule for rule in app.url_map.iter_rules()} >= {"/", "/predict", "/api/predict", "/images/<int:image_id>", "/healthz"}


def test_a_scoring_server_that_cannot_start_is_one_line_naming_the_model(tmp_path):
    from web.serve import ServerError, scoring_server

    uri = "models:/no-such-model/1"
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    with pytest.raises(ServerError) as failure, scoring_server(uri, wait=120, tracking_uri=store, log=tmp_path / "log"):
        pass
    message = str(failure.value)
    assert "\n" not in message and uri in message and "exited with code" in message, message
