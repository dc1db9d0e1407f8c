"""The upload page: upload a photo, see cat / dog / wild, its probabilities and similar images.

Run it with `flask --app web.app run` (development) or `gunicorn -c gunicorn.conf.py web.app:app`
(production); it talks to `mlflow models serve` at SCORING_URL. Routes and configuration:
docs/design.md and docs/serving.md; limits: docs/reliability.md.
"""

from __future__ import annotations

import base64
import hashlib
import io
import logging
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from typing import NoReturn

from flask import Flask, Request, Response, abort, current_app, jsonify, render_template, request, send_file
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestEntityTooLarge
from werkzeug.routing import IntegerConverter

from databases import catalogue
from databases.image_store import StoreError
from pyfunc.preprocess import ImageError, open_image
from steps import defaults
from web.model_info import ModelInfo
from web.scoring import ScoringClient, ScoringFailed, ScoringUnavailable
from web.security import SECURITY_HEADERS
from web.store import ImageStore, NotInStore, open_store

log = logging.getLogger(__name__)

DEFAULTS = {
    "SCORING_URL": "http://127.0.0.1:5001/invocations",
    "ANIMAL_DB": str(defaults.CATALOGUE),
    "IMAGE_STORE": str(defaults.IMAGE_STORE),  # where catalogue images are read: never the catalogue's say
    "MAX_UPLOAD_MB": 10,
    "SCORING_TIMEOUT": 30,  # seconds for the whole answer: connect (2 s at most), send, receive
    "UPLOAD_IDLE_TIMEOUT": 20,  # under gunicorn: seconds an upload may stall before a 408
    "SIMILAR_K": 6,  # similar images asked for: two rows of three on the page
    "THRESHOLD": None,  # below this confidence the page says "uncertain"; None: the model's default
    "CATALOGUE_TIMEOUT": 2,  # seconds a catalogue read may take (a locked or slow catalogue: 503, not a hung page)
}
# Catalogue images never change under their id (rows are keyed by content hash): cache them a day.
IMAGE_MAX_AGE = 86400
# What a browser can show (MPO is a JPEG with extra frames): the type comes from the file's header.
MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "BMP": "image/bmp", "GIF": "image/gif"}
REFUSALS_REMEMBERED = 10_000  # catalogue ids whose refusal was logged (each is logged once)


@dataclass
class Services:
    """What the routes use, built once per app from its configuration."""

    scoring: ScoringClient
    store: ImageStore
    refused: set[int]
    lock: threading.Lock


class CatalogueId(IntegerConverter):
    """Catalogue ids in URLs: ASCII digits only. werkzeug's `int` matches `\\d`, which takes any
    Unicode digit (`/images/١` would be image 1): one image, one URL."""

    regex = r"[0-9]+"


class InMemoryRequest(Request):
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        # Uploads never touch the disk (werkzeug spools files over 500 KB to a temporary file);
        # memory is bounded by MAX_CONTENT_LENGTH.
        return io.BytesIO()


# --- configuration ------------------------------------------------------------------------------


def load_config(overrides: dict | None = None) -> dict:
    """Defaults, then the environment, then `overrides` (tests, launchers); checked once, here."""
    config = {key: os.environ.get(key, default) for key, default in DEFAULTS.items()}
    config.update(overrides or {})
    for key in ("MAX_UPLOAD_MB", "SCORING_TIMEOUT", "UPLOAD_IDLE_TIMEOUT", "CATALOGUE_TIMEOUT"):
        config[key] = float(config[key])
    config["SIMILAR_K"] = int(config["SIMILAR_K"])
    config["THRESHOLD"] = None if config["THRESHOLD"] in (None, "") else float(config["THRESHOLD"])
    # Out of range, every request would fail at the scoring server instead.
    if not 0 <= config["SIMILAR_K"] <= 100:
        raise ValueError(f"SIMILAR_K must be in 0..100, not {config['SIMILAR_K']}")
    if config["THRESHOLD"] is not None and not 0 <= config["THRESHOLD"] <= 1:
        raise ValueError(f"THRESHOLD must be in 0..1, not {config['THRESHOLD']}")
    if config["SCORING_TIMEOUT"] <= 0 or config["UPLOAD_IDLE_TIMEOUT"] <= 0 or config["CATALOGUE_TIMEOUT"] <= 0:
        raise ValueError("SCORING_TIMEOUT, UPLOAD_IDLE_TIMEOUT and CATALOGUE_TIMEOUT must be positive")
    # Flask refuses bigger request bodies with 413 before reading them.
    config["MAX_CONTENT_LENGTH"] = int(config["MAX_UPLOAD_MB"] * 1024 * 1024)
    return config


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.url_map.converters["int"] = CatalogueId  # every <int:...> of this app: ASCII digits only
    app.config.update(load_config(config))
    app.json.sort_keys = False  # /api/predict keeps the model's column order
    app.extensions["animal"] = Services(
        ScoringClient(app.config["SCORING_URL"], app.config["SCORING_TIMEOUT"]),
        open_store(app.config["IMAGE_STORE"]),
        set(),
        threading.Lock(),
    )
    app.extensions["model_info"] = ModelInfo()  # the Production version's model card (web/model_info.py)
    app.extensions["model_info"].refresh_soon()
    app.context_processor(lambda: {"model": app.extensions["model_info"].footer()})  # templates/footer.html
    add_routes(app)
    add_error_handlers(app)
    app.before_request(bound_slow_uploads)
    app.after_request(security_headers)
    return app


def services() -> Services:
    return current_app.extensions["animal"]


# --- routes -------------------------------------------------------------------------------------


def add_routes(app: Flask) -> None:
    app.add_url_rule("/", "index", index, methods=["GET"])
    app.add_url_rule("/predict", "predict_page", predict_page, methods=["POST"])
    app.add_url_rule("/api/predict", "predict_api", predict_api, methods=["POST"])
    app.add_url_rule("/images/<int:image_id>", "image", image, methods=["GET"])
    app.add_url_rule("/healthz", "healthz", healthz, methods=["GET"])
    app.add_url_rule("/api/model", "model_api", model_api, methods=["GET"])
    app.add_url_rule("/model", "model_page", model_page, methods=["GET"])


def index() -> str:
    return render_template("index.html", result=None)


def predict_page() -> str:
    upload, image_format = read_upload()
    started = time.perf_counter()
    row = predict(upload)
    return render_template(
        "index.html",
        result=row,
        preview=f"data:{MIME[image_format]};base64,{base64.b64encode(upload).decode('ascii')}",
        filename=request.files["image"].filename,
        elapsed_ms=(time.perf_counter() - started) * 1000,
    )


def predict_api() -> Response:
    upload, _ = read_upload()
    return jsonify(predict(upload))


def model_api() -> Response:
    """The model card's facts of the Production version, as the registry has them."""
    facts, problem = current_app.extensions["model_info"].facts()
    if facts is None:
        abort(503, description=f"The model card is not available: {problem}.")
    return jsonify(facts)


def model_page() -> str:
    """The same card as a page a person reads (the footer links here; the JSON stays at /api/model)."""
    facts, problem = current_app.extensions["model_info"].facts()
    if facts is None:
        abort(503, description=f"The model card is not available: {problem}.")
    return render_template("model.html", card=facts)


def image(image_id: int) -> Response:
    """A catalogue image, read from the page's own image store, served only as the image type its
    header shows; any other row is a 404."""
    key = catalogue_key(image_id)
    try:
        data = services().store.read(key)
        mimetype = MIME[image_format(data)]
    except (NotInStore, ImageError, KeyError) as error:
        refuse(image_id, str(error) or "not an image type a browser shows")
    except StoreError as error:  # an object store that does not answer (team layout)
        log.warning("image store unavailable: %s", error)
        abort(503, description="The image store is not available.")
    return send_file(io.BytesIO(data), mimetype=mimetype, max_age=IMAGE_MAX_AGE, etag=hashlib.sha256(data).hexdigest()[:32])


def healthz() -> tuple[Response, int]:
    """Whether things work, never where they are (no paths, no addresses)."""
    ok = services().scoring.answers()
    body = {"ok": ok, "scoring_server": {"answers": ok}, "catalogue": {"readable": catalogue_readable()}}
    return jsonify(body), 200 if ok else 503


# --- what the routes share ----------------------------------------------------------------------


def read_upload() -> tuple[bytes, str]:
    """The uploaded file's bytes and image format, checked before the model is asked (400 if not usable)."""
    try:
        file = request.files.get("image")
        data = file.read() if file is not None else None
    except ClientDisconnected as error:
        # werkzeug reports a read that timed out (UPLOAD_IDLE_TIMEOUT, under gunicorn) as a disconnect.
        if isinstance(error.__context__, TimeoutError):
            abort(408, description="The upload stalled: the file did not arrive in time.")
        raise
    if data is None:
        abort(400, description="No file was sent: choose an image and upload it (form field 'image').")
    try:
        return data, image_format(data)
    except ImageError as error:
        abort(400, description=f"This file cannot be used: {error}.")


def image_format(data: bytes) -> str:
    """The format of an image file from its header only, with the same rules as the model, so bad
    uploads never reach the scoring server."""
    if not data:
        raise ImageError("the file is empty")
    return open_image(data).format


def predict(upload: bytes) -> dict:
    """The model's row for the upload: 503 when the scoring server is down or slow, 502 when its
    answer is not a row of the model's contract, 400 when the model cannot read the image."""
    params = {"k": current_app.config["SIMILAR_K"]}
    if current_app.config["THRESHOLD"] is not None:
        params["threshold"] = current_app.config["THRESHOLD"]
    try:
        row = services().scoring.predict(upload, params)
    except ScoringUnavailable as error:
        log.warning("scoring server: %s", error)
        abort(503, description=f"The model is not answering right now: {error}. Try again in a moment.")
    except ScoringFailed as error:
        log.warning("scoring server: %s", error)
        abort(502, description=f"The model gave no usable answer: {error}.")
    if row.get("error"):  # the model could not read this image although its header looked fine
        abort(400, description=f"This file cannot be used: {row['error']}.")
    return row


def open_catalogue() -> sqlite3.Connection:
    try:
        return catalogue.connect(current_app.config["ANIMAL_DB"], readonly=True, timeout=current_app.config["CATALOGUE_TIMEOUT"])
    except catalogue.DATABASE_ERRORS as error:  # SQLite or PostgreSQL: missing, down, damaged
        log.warning("catalogue unavailable: %s", error)
        abort(503, description="The image catalogue is not available.")


def catalogue_key(image_id: int) -> object:
    """The store key the catalogue gives for `image_id` (of whatever type the row holds), 404 if
    there is no such row, 503 if the catalogue cannot be read."""
    if not 0 < image_id < 2**63:  # ids are positive SQLite integers: a bigger one cannot even be asked
        abort(404, description=f"There is no catalogue image {image_id}.")
    conn = open_catalogue()  # a fresh read-only connection per request: not shared across threads
    try:
        # The raw bytes and the declared type: a row that is not valid text is an odd row (404),
        # not a decoding error of the whole catalogue (503).
        if catalogue.is_url(current_app.config["ANIMAL_DB"]):  # PostgreSQL: path is a TEXT column
            path = catalogue.image_path(conn, image_id)
            row = None if path is None else ("text", path.encode("utf-8"))
        else:
            row = conn.execute("SELECT typeof(path), CAST(path AS BLOB) FROM images WHERE id = ?", (image_id,)).fetchone()
    except catalogue.DATABASE_ERRORS as error:
        log.warning("catalogue unreadable: %s", error)
        abort(503, description="The image catalogue cannot be read.")
    finally:
        conn.close()
    if row is None:
        abort(404, description=f"There is no catalogue image {image_id}.")
    kind, raw = row[0], row[1]
    if kind != "text":
        return raw  # the store refuses anything but text
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def catalogue_readable() -> bool:
    try:
        conn = catalogue.connect(current_app.config["ANIMAL_DB"], readonly=True, timeout=current_app.config["CATALOGUE_TIMEOUT"])
    except catalogue.DATABASE_ERRORS:
        return False
    try:
        catalogue.image_path(conn, 1)  # reads the images table, on either database
        return True
    except catalogue.DATABASE_ERRORS:
        return False
    finally:
        conn.close()


def refuse(image_id: int, reason: str) -> NoReturn:
    """404 for a catalogue row the page will not serve; the reason is logged the first time only."""
    shared = services()
    with shared.lock:
        first = image_id not in shared.refused and len(shared.refused) < REFUSALS_REMEMBERED
        if first:
            shared.refused.add(image_id)
    if first:
        log.warning("catalogue image %d is not served: %s", image_id, reason)
    abort(404, description=f"There is no catalogue image {image_id}.")


# --- every response -----------------------------------------------------------------------------


def bound_slow_uploads() -> None:
    """Under gunicorn, a client that stops sending its upload frees its thread after
    UPLOAD_IDLE_TIMEOUT seconds of silence (gunicorn's own sockets wait forever)."""
    sock = request.environ.get("gunicorn.socket")
    if sock is not None and request.method == "POST":
        sock.settimeout(current_app.config["UPLOAD_IDLE_TIMEOUT"])


def security_headers(response: Response) -> Response:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)
    return response


def add_error_handlers(app: Flask) -> None:
    app.register_error_handler(HTTPException, http_error)
    app.register_error_handler(Exception, unexpected_error)


def http_error(error: HTTPException):
    if isinstance(error, RequestEntityTooLarge):
        error.description = f"The file is too large: uploads are limited to {current_app.config['MAX_UPLOAD_MB']:g} MB."
    return error_response(error.code or 500, error.name, error.description or "")


def unexpected_error(error: Exception):
    # Logged for us, never shown: the person sees a plain message, not a stack trace.
    log.exception("unexpected error on %s %s", request.method, request.path)
    return error_response(500, "Internal Server Error", "Something went wrong on our side.")


def error_response(status: int, title: str, message: str):
    if request.path.startswith("/api/") or request.path == "/healthz":
        return jsonify({"error": message, "status": status}), status
    return render_template("error.html", status=status, title=title, message=message), status


app = create_app()
