"""The security headers of every answer, the page's own and gunicorn's.

gunicorn answers a few requests itself, before the page sees them (a malformed request line,
headers over the limits of gunicorn.conf.py, an error outside the application): `install()`
makes those answers carry the same headers and no detail about the request.
"""

from __future__ import annotations

import html

SECURITY_HEADERS = {
    # No inline script or style anywhere; images come from here, the uploaded one inline (data:)
    # and the preview of the chosen file (blob:).
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def error_answer(status: int, reason: str) -> bytes:
    """A complete HTTP answer for gunicorn's own errors: status, security headers, a short page."""
    reason = reason.replace("\r", " ").replace("\n", " ")
    body = (f"<!doctype html><title>{status} {html.escape(reason)}</title><h1>{status} {html.escape(reason)}</h1>\n").encode()
    head = [
        f"HTTP/1.1 {status} {reason}",
        "Connection: close",
        "Content-Type: text/html; charset=utf-8",
        f"Content-Length: {len(body)}",
        *(f"{name}: {value}" for name, value in SECURITY_HEADERS.items()),
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def write_error(sock, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn.util.write_error's signature; the message (it may echo the request) is not sent."""
    from gunicorn import util

    util.write_nonblock(sock, error_answer(status_int, reason))


def install() -> None:
    """Route gunicorn's error answers through write_error (called from gunicorn.conf.py, in the
    master process before the workers fork)."""
    from gunicorn import util

    util.write_error = write_error
