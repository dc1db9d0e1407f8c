"""The client side of the scoring server (`mlflow models serve`): one image in, the model's row out."""
from __future__ import annotations

import base64
import threading
from urllib.parse import urlsplit, urlunsplit

import requests

CONNECT_TIMEOUT = 2.0  # a local scoring server accepts at once; longer means it is not there
HEALTH_TIMEOUT = 5.0


class ScoringUnavailable(RuntimeError):
    """The scoring server could not be reached or did not answer in time (HTTP 503)."""


class ScoringFailed(RuntimeError):
    """The scoring server answered, but not with a prediction (HTTP 502)."""


class ScoringClient:
    def __init__(self, url: str, read_timeout: float = 30.0):
        self.url = url
        self.timeout = (min(CONNECT_TIMEOUT, read_timeout), read_timeout)
        # One session per thread: keep-alive to the scoring server without sharing a Session
        # (requests does not promise that one Session is safe across threads).
        self._local = threading.local()

    @property
    def session(self) -> requests.Session:
        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    @property
    def ping_url(self) -> str:
        parts = urlsplit(self.url)
        return urlunsplit((parts.scheme, parts.netloc, "/ping", "", ""))

    def predict(self, image: bytes, params: dict) -> dict:
        """The model's output row for one image file (it may carry a per-row `error`)."""
        payload = {
            "dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(image).decode("ascii")]]},
            "params": params,
        }
        try:
            response = self.session.post(self.url, json=payload, timeout=self.timeout)
        except requests.Timeout:
            raise ScoringUnavailable(f"the scoring server did not answer within {self.timeout[1]:g} s") from None
        except requests.RequestException:
            raise ScoringUnavailable("the scoring server cannot be reached") from None
        if response.status_code >= 500:
            raise ScoringUnavailable(f"the scoring server failed (HTTP {response.status_code})")
        try:
            body = response.json()
        except ValueError:
            body = None
        if not response.ok:
            message = body.get("message") if isinstance(body, dict) else None
            raise ScoringFailed(f"the scoring server refused the request (HTTP {response.status_code})"
                                + (f": {message}" if message else ""))
        rows = body.get("predictions") if isinstance(body, dict) else None
        if not isinstance(rows, list) or len(rows) != 1 or not isinstance(rows[0], dict):
            raise ScoringFailed("the scoring server's answer is not one prediction row")
        return rows[0]

    def answers(self) -> tuple[bool, str]:
        """Whether the scoring server answers its /ping, and what we saw."""
        try:
            response = self.session.get(self.ping_url, timeout=(self.timeout[0], HEALTH_TIMEOUT))
        except requests.RequestException as error:
            return False, type(error).__name__
        return response.ok, f"HTTP {response.status_code}"
