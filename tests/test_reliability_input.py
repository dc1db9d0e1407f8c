"""Bad input, at the three levels where it arrives: the pyfunc in Python, the real scoring server over
HTTP (which must keep answering /ping after each), and the upload page. Every case gets a clear,
per-row or per-request error, or a normal answer; never a crash, a 500 or a hang.

test_preprocess.py checks the decoding of each odd format on its own; here the same files go
through the whole served path. The web tests with header-only bombs, missing fields and URL
tricks are in test_web.py; this file adds what they do not reach.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import json
import struct
import time
import zlib
from dataclasses import dataclass

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException
from PIL import Image, ImageFile

from databases import catalogue
from pyfunc.model import BATCH, MAX_REQUEST_PIXELS, MAX_ROWS
from pyfunc.preprocess import MAX_PIXELS, ImageError, load_image
from tests.outputs import assert_same_label, assert_same_neighbours, close
from web.app import create_app

ORIENTATION = 0x0112


# --- the files ----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def bomb(side: int = 7000) -> bytes:
    """A real, valid PNG of side x side black pixels: about 150 KB on disk, 147 MB once decoded.
    7000 x 7000 = 49 MP is past our 40 MP limit but under Pillow's own (89 MP): only ours stops it."""
    compressor, row = zlib.compressobj(9), b"\0" * (1 + 3 * side)  # filter byte + RGB
    body = b"".join(compressor.compress(row) for _ in range(side)) + compressor.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that claims width x height but holds almost nothing (past Pillow's limit too)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b"")


def truncated_jpeg() -> bytes:
    noise = np.random.default_rng(1).integers(0, 255, (200, 200, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "JPEG")[:-4000]


def sixteen_bit_png() -> bytes:
    ramp = np.tile(np.linspace(0, 65535, 48, dtype=np.uint16), (48, 1))
    return encode(Image.fromarray(ramp), "PNG")


def palette_with_transparency() -> bytes:
    image = Image.new("P", (40, 40), 0)
    image.putpalette([0, 0, 0, 200, 60, 20] + [0] * 762)
    image.paste(1, (10, 10, 30, 30))
    return encode(image, "PNG", transparency=0)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), colour) for colour in ((20, 160, 40), (160, 20, 40), (20, 40, 160))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=40, loop=0)


def exif_rotated(upright: Image.Image, fmt: str) -> bytes:
    """The photo stored lying on its side, with the EXIF tag that says "turn 90 degrees clockwise"."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    return encode(upright.transpose(Image.Transpose.ROTATE_90), fmt, exif=exif.tobytes())


@dataclass(frozen=True)
class Case:
    data: bytes
    model_error: str | None  # in the model's row `error`; None: the image is answered
    page_error: str | None  # in the page's 400 message; None: 200 with a label


@pytest.fixture(scope="module")
def photo(pipeline) -> bytes:
    """A catalogue photo (JPEG) of the tiny pipeline."""
    return next(pipeline.image_store.glob("val/cat/*.jpg")).read_bytes()


@pytest.fixture(scope="module")
def cases(photo) -> dict[str, Case]:
    upright = Image.open(io.BytesIO(photo)).convert("RGB")
    return {
        "empty": Case(b"", "empty image", "the file is empty"),
        "not an image": Case(b"just some text, not a picture\n", "not an image", "not an image"),
        "truncated jpeg": Case(truncated_jpeg(), "could not decode", "could not decode image"),
        "tiff": Case(encode(upright, "TIFF"), "unsupported image format TIFF", "unsupported image format TIFF"),
        "bomb 7000x7000": Case(bomb(), "too large", "image too large: 7000x7000 pixels"),
        "bomb 100000x100000": Case(header_only_png(100_000, 100_000), "too large", "image too large"),
        "one pixel": Case(encode(Image.new("RGB", (1, 1), (200, 120, 40)), "PNG"), None, None),
        "16-bit png": Case(sixteen_bit_png(), None, None),
        "cmyk jpeg": Case(encode(upright.convert("CMYK"), "JPEG"), None, None),
        "palette with transparency": Case(palette_with_transparency(), None, None),
        "animated gif": Case(animated_gif(), None, None),
        "exif-rotated jpeg": Case(exif_rotated(upright, "JPEG"), None, None),
    }


CASE_NAMES = [
    "empty",
    "not an image",
    "truncated jpeg",
    "tiff",
    "bomb 7000x7000",
    "bomb 100000x100000",
    "one pixel",
    "16-bit png",
    "cmyk jpeg",
    "palette with transparency",
    "animated gif",
    "exif-rotated jpeg",
]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def check_row(row: dict, expected_error: str | None) -> None:
    if expected_error is None:
        assert row["error"] is None, row["error"]
        assert row["label"] in ("cat", "dog", "wild") and 0 < row["confidence"] <= 1
        assert sum(row["probabilities"].values()) == pytest.approx(1, abs=1e-3)
    else:
        assert row["error"] and expected_error in row["error"], row["error"]
        assert row["label"] is None and row["confidence"] is None and row["probabilities"] is None
        assert list(row["similar"]) == []


# --- the model, in Python -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(pipeline):
    return mlflow.pyfunc.load_model("models:/animal/Production")


@pytest.fixture
def forward_calls(model, monkeypatch) -> list[np.ndarray]:
    """Every batch the model's network is called with (what reaches the CNN, after preprocessing)."""
    inner = model.unwrap_python_model()
    calls: list[np.ndarray] = []
    original = inner._forward

    def spy(batch):
        calls.append(np.asarray(batch))
        return original(batch)

    monkeypatch.setattr(inner, "_forward", spy)
    return calls


def test_model_answers_every_row_of_a_mixed_batch(model, cases, photo):
    """All the bad and odd files in one frame, raw and base64, among good photos: one row each, in order."""
    names = CASE_NAMES
    frame = pd.DataFrame(
        {"image": [photo] + [cases[n].data for n in names] + [b64(cases[n].data) for n in names] + ["%%% not base64 %%%", None, 42]}
    )
    rows = model.predict(frame).to_dict("records")
    assert len(rows) == 1 + 2 * len(names) + 3
    check_row(rows[0], None)
    for offset in (1, 1 + len(names)):
        for i, name in enumerate(names):
            check_row(rows[offset + i], cases[name].model_error)
    check_row(rows[-3], "invalid base64")
    check_row(rows[-2], "expected base64 text or bytes")
    check_row(rows[-1], "expected base64 text or bytes")


def test_model_refuses_a_bomb_before_decoding_a_pixel(model, monkeypatch):
    def no_decoding(self, *args, **kwargs):
        raise AssertionError("pixels of a decompression bomb were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    started = time.monotonic()
    (row,) = model.predict(pd.DataFrame({"image": [bomb()]})).to_dict("records")
    check_row(row, f"limit {MAX_PIXELS:,}")
    assert time.monotonic() - started < 5
    with pytest.raises(ImageError, match="too large"):
        load_image(bomb(), 32)


def test_exif_photo_is_decoded_the_same_in_training_and_serving(model, forward_calls, photo, tmp_path):
    """The training input pipeline (steps.train.decoded_images) and the served model see the very same
    array for an EXIF-rotated photo, and it is the upright photo: no train/serve skew."""
    from steps.train import decoded_images

    upright = Image.open(io.BytesIO(photo)).convert("RGB")
    size = model.unwrap_python_model().image_size
    for fmt in ("JPEG", "PNG"):
        rotated = exif_rotated(upright, fmt)
        file = tmp_path / f"rotated.{fmt.lower()}"
        file.write_bytes(rotated)
        (trained_on,) = list(decoded_images([str(file)], size).as_numpy_iterator())
        forward_calls.clear()
        served = model.predict(pd.DataFrame({"image": [rotated]}))
        assert served.error[0] is None
        np.testing.assert_array_equal(forward_calls[0][0], trained_on)
        np.testing.assert_array_equal(trained_on, load_image(rotated, size))

    # Lossless: the rotated PNG with its tag is exactly the upright photo, and is answered the same.
    lossless_upright, lossless_rotated = encode(upright, "PNG"), exif_rotated(upright, "PNG")
    np.testing.assert_array_equal(load_image(lossless_rotated, size), load_image(lossless_upright, size))
    upright_answer, rotated_answer = model.predict(pd.DataFrame({"image": [lossless_upright, lossless_rotated]})).to_dict("records")
    assert_same_label(rotated_answer["label"], upright_answer["label"], upright_answer["probabilities"])
    for label, p in upright_answer["probabilities"].items():
        assert rotated_answer["probabilities"][label] == close(p)
    assert_same_neighbours([item["id"] for item in rotated_answer["similar"]], upright_answer["similar"])
    # And the tag matters: without it, the same pixels are a different picture.
    lying = encode(upright.transpose(Image.Transpose.ROTATE_90), "PNG")
    assert not np.array_equal(load_image(lying, size), load_image(lossless_upright, size))


def test_model_answers_a_batch_of_1000_rows_in_bounded_batches(model, forward_calls, pipeline):
    photos = [f.read_bytes() for f in sorted(pipeline.image_store.glob("val/*/*.jpg"))[:5]]
    values: list = [photos[i % len(photos)] for i in range(1000)]
    bad = set(range(7, 1000, 100))
    for i in bad:
        values[i] = b"not an image"
    started = time.monotonic()
    rows = model.predict(pd.DataFrame({"image": values})).to_dict("records")
    elapsed = time.monotonic() - started
    assert len(rows) == 1000 and elapsed < 60
    single = model.predict(pd.DataFrame({"image": photos})).to_dict("records")
    for i, row in enumerate(rows):
        if i in bad:
            check_row(row, "not an image")
        else:
            answer = single[i % len(photos)]
            assert_same_label(row["label"], answer["label"], answer["probabilities"])
            assert row["confidence"] == close(answer["confidence"])
    # Memory is bounded: the network never sees more than BATCH images at once.
    sizes = [len(batch) for batch in forward_calls[:-1]]  # the last call is `single`
    assert max(sizes) <= BATCH and sum(sizes) == 1000 - len(bad)


def test_served_model_refuses_requests_too_big_for_its_timeout_up_front(model, forward_calls, monkeypatch, photo):
    """Under `mlflow models serve` (which sets this variable) a request over MAX_ROWS rows or
    MAX_REQUEST_PIXELS pixels in all is refused before a pixel is decoded; in Python (batch
    scoring) the same frame is answered."""
    monkeypatch.setenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "true")
    with pytest.raises(MlflowException, match=f"too many rows: {MAX_ROWS + 1:,} .*at most {MAX_ROWS:,}.*-e score"):
        model.predict(pd.DataFrame({"image": [photo] * (MAX_ROWS + 1)}))
    side = 6000  # 36 MP each: under MAX_PIXELS, so only their sum is too much
    count = MAX_REQUEST_PIXELS // side**2 + 1
    with pytest.raises(MlflowException, match="too many pixels in one request"):
        model.predict(pd.DataFrame({"image": [header_only_png(side, side)] * count}))
    assert not forward_calls
    assert len(model.predict(pd.DataFrame({"image": [header_only_png(side, side)] * (count - 1)}))) == count - 1
    monkeypatch.delenv("_MLFLOW_IS_IN_SERVING_ENVIRONMENT")
    assert len(model.predict(pd.DataFrame({"image": [photo] * (MAX_ROWS + 1)}))) == MAX_ROWS + 1


# --- the real scoring server, over HTTP ---------------------------------------------------------


def invoke(server: str, body, timeout: float = 60) -> requests.Response:
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(f"{server}/invocations", data=data, headers={"Content-Type": "application/json"}, timeout=timeout)


def assert_still_serving(server: str) -> None:
    assert requests.get(f"{server}/ping", timeout=10).status_code == 200


def split_body(values: list[str], **params) -> dict:
    body = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    if params:
        body["params"] = params
    return body


@pytest.mark.parametrize("name", CASE_NAMES)
def test_scoring_server_answers_each_file_and_keeps_serving(scoring_server, cases, name):
    started = time.monotonic()
    response = invoke(scoring_server, split_body([b64(cases[name].data)]))
    assert response.status_code == 200, response.text
    (row,) = response.json()["predictions"]
    check_row(row, cases[name].model_error)
    assert time.monotonic() - started < 30
    assert_still_serving(scoring_server)


def test_scoring_server_answers_a_mixed_batch_in_order(scoring_server, cases, photo):
    values = [b64(photo)] + [b64(cases[n].data) for n in CASE_NAMES] + ["not base64!", ""]
    response = invoke(scoring_server, split_body(values, k=2))
    assert response.status_code == 200, response.text
    rows = response.json()["predictions"]
    assert len(rows) == len(values)
    check_row(rows[0], None)
    for row, name in zip(rows[1:], CASE_NAMES):
        check_row(row, cases[name].model_error)
    check_row(rows[-2], "invalid base64")
    check_row(rows[-1], "empty")
    assert_still_serving(scoring_server)


def test_scoring_server_answers_1000_rows(scoring_server, pipeline):
    photos = [b64(f.read_bytes()) for f in sorted(pipeline.image_store.glob("val/*/*.jpg"))[:5]]
    values = [photos[i % len(photos)] for i in range(1000)]
    values[500] = b64(b"not an image")
    started = time.monotonic()
    response = invoke(scoring_server, {"dataframe_records": [{"image": v} for v in values], "params": {"k": 1}}, timeout=120)
    assert response.status_code == 200, response.text[:500]
    rows = response.json()["predictions"]
    assert len(rows) == 1000 and time.monotonic() - started < 120
    assert sum(row["error"] is not None for row in rows) == 1 and "not an image" in rows[500]["error"]
    assert all(len(row["similar"]) <= 1 for row in rows)
    assert_still_serving(scoring_server)


def test_scoring_server_refuses_too_many_rows_at_once_and_keeps_serving(scoring_server):
    """The probe's 50,000 one-pixel rows: refused at once (400), not a 504 after the server's timeout."""
    pixel = b64(encode(Image.new("RGB", (1, 1)), "PNG"))
    response = invoke(scoring_server, split_body([pixel] * 50_000), timeout=120)
    assert response.status_code == 400 and "too many rows" in response.json()["message"]
    assert_still_serving(scoring_server)


def test_mlflows_own_error_answers_are_as_documented(scoring_server):
    """What `mlflow models serve` cannot be configured not to do (docs/reliability.md): a CSV body
    it cannot parse gets a `stack_trace` with its installation paths, a JSON body nested 100,000
    deep a bare 500. If MLflow changes this, the docs change with it. The page never forwards a
    body (test_reliability_probe.py)."""
    csv = requests.post(
        f"{scoring_server}/invocations", data=b'image\n"unterminated,\x00\n1,2,3\n', headers={"Content-Type": "text/csv"}, timeout=60
    )
    assert csv.status_code == 400 and "stack_trace" in csv.json()
    deep = invoke(scoring_server, b"[" * 100_000 + b"]" * 100_000)
    assert deep.status_code == 500
    assert_still_serving(scoring_server)


@pytest.mark.parametrize(
    "body, status",
    [
        (b"this is not json", 400),
        ({"dataframe_split": {"columns": ["picture"], "data": [["x"]]}}, 400),  # wrong column name
        ({"dataframe_records": [{"photo": "x"}]}, 400),
        ({"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": {"k": "many"}}, 400),
        ({"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": {"k": 10**6}}, 400),
        ({"dataframe_split": {"columns": ["image"], "data": [["x"]]}, "params": {"threshold": 7}}, 400),
    ],
    ids=["not json", "wrong column", "wrong record key", "k not a number", "k too big", "threshold out of range"],
)
def test_scoring_server_refuses_bad_requests_and_keeps_serving(scoring_server, body, status):
    response = invoke(scoring_server, body)
    assert response.status_code == status, response.text
    assert response.json()["message"]  # a clear message, as JSON
    assert "Traceback" not in response.text
    assert_still_serving(scoring_server)


# --- the page -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(pipeline, scoring_server):
    return create_app(
        {"SCORING_URL": f"{scoring_server}/invocations", "ANIMAL_DB": str(pipeline.db), "IMAGE_STORE": str(pipeline.image_store)}
    ).test_client()


def upload(client, path: str, data: bytes, filename: str = "face.jpg"):
    return client.post(path, data={"image": (io.BytesIO(data), filename)}, content_type="multipart/form-data")


@pytest.mark.parametrize("name", CASE_NAMES)
def test_page_answers_each_file(client, cases, name):
    case = cases[name]
    for path in ("/api/predict", "/predict"):
        response = upload(client, path, case.data)
        text = response.get_data(as_text=True)
        assert "Traceback" not in text
        if case.page_error is None:
            assert response.status_code == 200, text
            if path == "/api/predict":
                check_row(response.json, None)
            else:
                assert "data-label>" in text
        else:
            assert response.status_code == 400, text
            assert case.page_error in (response.json["error"] if path == "/api/predict" else text)


def test_page_gives_the_upright_answer_for_an_exif_rotated_photo(client, photo):
    upright = Image.open(io.BytesIO(photo)).convert("RGB")
    straight = upload(client, "/api/predict", encode(upright, "PNG")).json
    rotated = upload(client, "/api/predict", exif_rotated(upright, "PNG")).json
    assert straight == rotated and straight["error"] is None


@pytest.mark.parametrize(
    "filename",
    [
        "../../etc/passwd",
        "..\\..\\windows\\win.ini",
        "/etc/shadow",
        'it\'s "quoted".jpg',
        "x'; DROP TABLE images;--.jpg",
        "<script>alert(1)</script>.jpg",
        "a%00b.jpg",
        "",
    ],
)
def test_hostile_upload_filenames_are_only_shown_escaped(client, photo, pipeline, filename):
    from markupsafe import escape

    def catalogue_state() -> tuple[str, int]:
        conn = catalogue.connect(pipeline.db, readonly=True)
        try:
            count = conn.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            conn.close()
        return hashlib.sha256(pipeline.db.read_bytes()).hexdigest(), count

    before = catalogue_state()
    response = upload(client, "/predict", photo, filename)
    html = response.get_data(as_text=True)
    assert response.status_code == 200 and "data-label>" in html
    if filename and not set(filename) & set('"\\'):  # multipart quoting mangles those two: shown as parsed
        assert f"<figcaption>{escape(filename)}</figcaption>" in html
    assert "<script>alert" not in html
    assert upload(client, "/api/predict", photo, filename).status_code == 200
    # Nothing was stored or changed: the catalogue is byte for byte the same and still whole.
    assert catalogue_state() == before


@pytest.mark.parametrize("path", ["/predict", "/api/predict"])
def test_upload_field_without_a_file(client, path):
    # What a browser sends when no file was chosen: the field, an empty name and no bytes.
    empty = client.post(path, data={"image": (io.BytesIO(b""), "")}, content_type="multipart/form-data")
    assert empty.status_code == 400 and "empty" in empty.get_data(as_text=True)
    # The field as plain text, not a file.
    text = client.post(path, data={"image": "cat.jpg"}, content_type="multipart/form-data")
    assert text.status_code == 400 and "No file was sent" in text.get_data(as_text=True)


def test_upload_limit_counts_the_whole_request(pipeline, scoring_server, photo):
    client = create_app({"SCORING_URL": f"{scoring_server}/invocations", "ANIMAL_DB": str(pipeline.db), "MAX_UPLOAD_MB": 1}).test_client()
    just_under = photo + bytes(1024 * 1024 - len(photo) - 4096)  # a JPEG with trailing bytes: still fine
    assert upload(client, "/api/predict", just_under).status_code == 200
    over = photo + bytes(1024 * 1024)
    response = upload(client, "/api/predict", over)
    assert response.status_code == 413 and "limited to 1 MB" in response.json["error"]


@pytest.mark.parametrize(
    "path", ["/images/99999999999999999999", "/images/9223372036854775808", "/images/999999999", "/images/abc", "/images/../../etc/passwd"]
)
def test_image_ids_out_of_range_are_404(client, path):
    response = client.get(path)
    assert response.status_code == 404, response.get_data(as_text=True)
    assert b"root:" not in response.data and b"Traceback" not in response.data
