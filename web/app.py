"""The upload page: upload a photo, see cat / dog / wild, its probabilities and similar images.

Run it with `flask --app web.app run` (development) or `gunicorn 'web.app:app'` (production);
it talks to `mlflow models serve` at SCORING_URL. Routes and configuration: docs/serving.md.
"""
from __future__ import annotations

import base64
import io
import logging
import os
import sqlite3
import time
from pathlib import Path

from flask import Flask, Request, Response, abort, jsonify, render_template, request, send_file
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from databases import catalogue
from pyfunc.preprocess import ImageError, open_image
from web.scoring import ScoringClient, ScoringFailed, ScoringUnavailable

log = logging.getLogger(__name__)

DEFAULTS = {
    "SCORING_URL": "http://127.0.0.1:5001/invocations",
    "ANIMAL_DB": "databases/animal.db",
    "MAX_UPLOAD_MB": 10,
    "SCORING_TIMEOUT": 30,  # seconds to wait for a prediction (connect: 2 s)
    "SIMILAR_K": 6,  # similar images asked for: two rows of three on the page
    "THRESHOLD": None,  # below this confidence the page says "uncertain"; None: the model's default
}
# Catalogue images never change under their id (rows are keyed by content hash): cache them a day.
IMAGE_MAX_AGE = 86400
# What a browser can show as a data: URL (MPO is a JPEG with extra frames).
MIME = {"JPEG": "image/jpeg", "MPO": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp",
        "BMP": "image/bmp", "GIF": "image/gif"}
SECURITY_HEADERS = {
    # No inline script or style anywhere; images come from here, the uploaded one inline (data:)
    # and the preview of the chosen file (blob:).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


class InMemoryRequest(Request):
    def _get_file_stream(self, total_content_length, content_type, filename=None, content_length=None):
        # Uploads never touch the disk (werkzeug spools files over 500 KB to a temporary file);
        # memory is bounded by MAX_CONTENT_LENGTH.
        return io.BytesIO()


def load_config(overrides: dict | None = None) -> dict:
    """Defaults, then the environment, then `overrides` (tests, launchers)."""
    config = {key: os.environ.get(key, default) for key, default in DEFAULTS.items()}
    config.update(overrides or {})
    config["MAX_UPLOAD_MB"] = float(config["MAX_UPLOAD_MB"])
    config["SCORING_TIMEOUT"] = float(config["SCORING_TIMEOUT"])
    config["SIMILAR_K"] = int(config["SIMILAR_K"])
    config["THRESHOLD"] = None if config["THRESHOLD"] in (None, "") else float(config["THRESHOLD"])
    # Checked here, once: out of range, every request would fail at the scoring server instead.
    if not 0 <= config["SIMILAR_K"] <= 100:
        raise ValueError(f"SIMILAR_K must be in 0..100, not {config['SIMILAR_K']}")
    if config["THRESHOLD"] is not None and not 0 <= config["THRESHOLD"] <= 1:
        raise ValueError(f"THRESHOLD must be in 0..1, not {config['THRESHOLD']}")
    # Flask refuses bigger request bodies with 413 before reading them.
    config["MAX_CONTENT_LENGTH"] = int(config["MAX_UPLOAD_MB"] * 1024 * 1024)
    return config


def create_app(config: dict | None = None) -> Flask:
    app = Flask(__name__)
    app.request_class = InMemoryRequest
    app.config.update(load_config(config))
    app.json.sort_keys = False  # /api/predict keeps the model's column order
    scoring = ScoringClient(app.config["SCORING_URL"], app.config["SCORING_TIMEOUT"])

    @app.get("/")
    def index() -> str:
        return render_template("index.html", result=None)

    @app.post("/predict")
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

    @app.post("/api/predict")
    def predict_api() -> Response:
        upload, _ = read_upload()
        return jsonify(predict(upload))

    @app.get("/images/<int:image_id>")
    def image(image_id: int) -> Response:
        try:
            conn = catalogue.connect(app.config["ANIMAL_DB"], readonly=True)
        except (FileNotFoundError, sqlite3.Error) as error:
            log.warning("catalogue unavailable: %s", error)
            abort(503, description="The image catalogue is not available.")
        try:  # a fresh read-only connection per request: sqlite connections are not shared across threads
            file = catalogue.image_file(conn, image_id)
        except (LookupError, sqlite3.Error) as error:
            log.warning("catalogue unreadable: %s", error)
            abort(503, description="The image catalogue cannot be read.")
        finally:
            conn.close()
        if file is None:
            abort(404, description=f"There is no catalogue image {image_id}.")
        return send_file(file, max_age=IMAGE_MAX_AGE)

    @app.get("/healthz")
    def healthz() -> tuple[Response, int]:
        ok, seen = scoring.answers()
        body = {"ok": ok, "scoring_server": {"url": scoring.ping_url, "answers": ok, "seen": seen},
                "catalogue": {"path": str(app.config["ANIMAL_DB"]), "found": Path(app.config["ANIMAL_DB"]).is_file()}}
        return jsonify(body), 200 if ok else 503

    def predict(upload: bytes) -> dict:
        params = {"k": app.config["SIMILAR_K"]}
        if app.config["THRESHOLD"] is not None:
            params["threshold"] = app.config["THRESHOLD"]
        try:
            row = scoring.predict(upload, params)
        except ScoringUnavailable as error:
            log.warning("%s: %s", scoring.url, error)
            abort(503, description=f"The model is not answering right now: {error}. Try again in a moment.")
        except ScoringFailed as error:
            log.warning("%s: %s", scoring.url, error)
            abort(502, description=f"The model gave no usable answer: {error}.")
        if row.get("error"):  # the model could not read this image although its header looked fine
            abort(400, description=f"This file cannot be used: {row['error']}.")
        return row

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if isinstance(error, RequestEntityTooLarge):
            error.description = (f"The file is too large: uploads are limited to "
                                 f"{app.config['MAX_UPLOAD_MB']:g} MB.")
        return error_response(error.code or 500, error.name, error.description or "")

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        # Logged for us, never shown: the person sees a plain message, not a stack trace.
        log.exception("unexpected error on %s %s", request.method, request.path)
        return error_response(500, "Internal Server Error", "Something went wrong on our side.")

    @app.after_request
    def security_headers(response: Response) -> Response:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    return app


def read_upload() -> tuple[bytes, str]:
    """The uploaded file's bytes and image format, checked before the model is asked (400 if not usable)."""
    file = request.files.get("image")
    if file is None:
        abort(400, description="No file was sent: choose an image and upload it (form field 'image').")
    data = file.read()
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


def error_response(status: int, title: str, message: str):
    if request.path.startswith("/api/") or request.path == "/healthz":
        return jsonify({"error": message, "status": status}), status
    return render_template("error.html", status=status, title=title, message=message), status


app = create_app()
