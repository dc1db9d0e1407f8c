"""The client side of the scoring server (`mlflow models serve`): one image in, the model's row out.

Two promises to the page: an answer comes within `timeout` seconds in all (connecting, sending and
receiving together, so a server that trickles its answer cannot hold a request longer), and what
comes back is a row of the model's output contract (docs/design.md) or an error, never anything
that merely looks like a row.
"""

from __future__ import annotations

import base64
import http.client
import io
import json
import logging
import math
import socket
import ssl
import time
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0  # a local scoring server accepts at once; longer means it is not there
HEALTH_TIMEOUT = 5.0
MAX_ANSWER_BYTES = 1024 * 1024  # one row with at most 100 similar images is a few KB
REQUIRED = ("label", "confidence", "probabilities", "uncertain", "similar", "error")
# Columns the contract adds later (docs/design.md, unfamiliar-image detection): checked if present.
OPTIONAL = ("unfamiliar", "familiarity")


class ScoringUnavailable(RuntimeError):
    """The scoring server could not be reached or did not answer in time (HTTP 503)."""


class ScoringFailed(RuntimeError):
    """The scoring server answered, but not with a prediction (HTTP 502)."""


class _Answer(io.BytesIO):
    """The bytes received, as the socket `http.client` parses a response from."""

    def makefile(self, *args, **kwargs) -> io.BytesIO:
        return self


class ScoringClient:
    def __init__(self, url: str, timeout: float = 30.0):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"SCORING_URL must be an http:// or https:// URL, not {url!r}")
        self.url, self.timeout = url, timeout
        self._host, self._netloc = parts.hostname, parts.netloc.rsplit("@", 1)[-1]  # no credentials in Host
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._tls = ssl.create_default_context() if parts.scheme == "https" else None
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")

    def predict(self, image: bytes, params: dict) -> dict:
        """The model's row for one image file, checked against the output contract (it may carry a
        per-row `error`). Raises ScoringUnavailable (down, slow, failing) or ScoringFailed."""
        payload = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode("ascii")]]}, "params": params}
        status, body = self.exchange("POST", self._path, json.dumps(payload).encode(), self.timeout)
        if status >= 500:
            raise ScoringUnavailable(f"the scoring server failed (HTTP {status})")
        try:
            answer = json.loads(body)
        except (ValueError, RecursionError):
            answer = None
        if not 200 <= status < 300:
            # Its message stays in our log: MLflow's may quote the request or carry a stack trace.
            message = answer.get("message") if isinstance(answer, dict) else None
            log.warning("the scoring server refused a request (HTTP %d): %.300s", status, message)
            raise ScoringFailed(f"the scoring server refused the request (HTTP {status})")
        rows = answer.get("predictions") if isinstance(answer, dict) else None
        if not isinstance(rows, list) or len(rows) != 1:
            raise ScoringFailed("the scoring server's answer is not one prediction row")
        return check_row(rows[0], params.get("k", 100))

    def answers(self) -> bool:
        """Whether the scoring server answers its /ping."""
        try:
            status, _ = self.exchange("GET", "/ping", b"", HEALTH_TIMEOUT)
        except (ScoringUnavailable, ScoringFailed):
            return False
        return status == 200

    def exchange(self, method: str, path: str, body: bytes, timeout: float) -> tuple[int, bytes]:
        """One HTTP request on a fresh connection, all of it within `timeout` seconds: (status, body)."""
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            return left

        head = (
            f"{method} {path} HTTP/1.1\r\nHost: {self._netloc}\r\nConnection: close\r\n"
            f"Accept: application/json\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode("latin-1")
        received = bytearray()
        try:
            with socket.create_connection((self._host, self._port), timeout=min(CONNECT_TIMEOUT, remaining())) as sock:
                conn = self._tls.wrap_socket(sock, server_hostname=self._host) if self._tls else sock
                conn.settimeout(remaining())
                conn.sendall(head + body)  # one timeout for the whole send (Python >= 3.5)
                while chunk := _receive(conn, remaining()):
                    received += chunk
                    if len(received) > MAX_ANSWER_BYTES:
                        raise ScoringFailed(f"the scoring server's answer is larger than {MAX_ANSWER_BYTES:,} bytes")
        except TimeoutError:
            raise ScoringUnavailable(f"the scoring server did not answer within {timeout:g} s") from None
        except OSError:
            raise ScoringUnavailable("the scoring server cannot be reached") from None
        return _parse(bytes(received))


def _receive(conn: socket.socket, timeout: float) -> bytes:
    conn.settimeout(timeout)
    return conn.recv(65536)


def _parse(raw: bytes) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(_Answer(raw))  # type: ignore[arg-type]
    try:
        response.begin()
        return response.status, response.read()
    except (http.client.HTTPException, ValueError):
        raise ScoringFailed("the scoring server's answer is not HTTP") from None


# --- the output contract ------------------------------------------------------------------------


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _probability(value: object) -> bool:
    return _number(value) and 0.0 <= value <= 1.0


def _similar_item(item: object) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("id"), int)
        and not isinstance(item["id"], bool)
        and item["id"] > 0
        and isinstance(item.get("path"), str)
        and isinstance(item.get("label"), str)
        and _number(item.get("score"))
    )


def _problem(row: dict, k: int) -> str | None:
    """What breaks the contract in a row without an `error`, or None."""
    probabilities = row["probabilities"]
    if (
        not isinstance(probabilities, dict)
        or not probabilities
        or not all(isinstance(name, str) and _probability(p) for name, p in probabilities.items())
    ):
        return "probabilities is not a mapping of labels to numbers in 0..1"
    if not isinstance(row["label"], str) or row["label"] not in probabilities:
        return "label is not one of the model's labels"
    if not _probability(row["confidence"]):
        return "confidence is not a number in 0..1"
    if not isinstance(row["uncertain"], bool):
        return "uncertain is not true or false"
    similar = row["similar"]
    if not isinstance(similar, list) or len(similar) > k or not all(_similar_item(item) for item in similar):
        return f"similar is not a list of at most {k} {{id, path, label, score}}"
    if row.get("unfamiliar") is not None and not isinstance(row["unfamiliar"], bool):
        return "unfamiliar is not true or false"
    if row.get("familiarity") is not None and not _number(row["familiarity"]):
        return "familiarity is not a number"
    return None


def check_row(row: object, k: int) -> dict:
    """The row, reduced to the contract's columns, if it follows the model's output contract
    (docs/design.md); otherwise ScoringFailed. A row with an `error` text is passed on as it is:
    the model could not read that image."""
    if not isinstance(row, dict) or not all(column in row for column in REQUIRED):
        raise ScoringFailed(f"the scoring server's answer is not a row of the model's output (columns {', '.join(REQUIRED)} expected)")
    error = row["error"]
    if error is not None:
        if not isinstance(error, str):
            raise ScoringFailed("the scoring server's row has an error that is not text")
        return {"error": error[:500]}
    problem = _problem(row, k)
    if problem:
        raise ScoringFailed(f"the scoring server's row breaks the model's output contract: {problem}")
    # Columns nobody documented are dropped, not passed on to the page or the API.
    return {column: row[column] for column in (*REQUIRED, *OPTIONAL) if column in row}
