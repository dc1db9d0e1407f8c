"""gunicorn settings for the page: `gunicorn -c gunicorn.conf.py web.app:app` (what `make serve` runs).

Threaded workers, so that a slow client holds one thread, not a whole worker: with the defaults
below, 2 x 32 = 64 requests are served at once, and a client that trickles its request still leaves
the others answered (tests/test_reliability_probe.py::test_slow_clients_do_not_stop_the_page,
tests/test_web_faults.py::test_twenty_trickling_clients_leave_the_page_answering). Threads, not
workers: each trickling connection holds one thread of the worker that accepted it, and the two
workers do not share them out evenly, so with 8 threads a worker was full at 12 such clients
(issue 19); an idle thread costs a stack, not a copy of the app. gunicorn has no deadline for reading
request headers, so on the internet put a buffering reverse proxy in front (nginx, docs/serving.md),
which reads each request whole before it reaches a thread here.
"""

import os
import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parent)
bind = os.environ.get("PAGE_BIND", "127.0.0.1:8000")
worker_class = "gthread"
workers = int(os.environ.get("PAGE_WORKERS", "2"))
threads = int(os.environ.get("PAGE_THREADS", "32"))
# gthread: a worker whose main loop is silent this long is restarted (its threads are not timed:
# the page bounds its own waits, SCORING_TIMEOUT and UPLOAD_IDLE_TIMEOUT).
timeout = 60
graceful_timeout = 30
keepalive = 5  # seconds an idle keep-alive connection is kept, then closed
# Requests a browser never sends: refused by gunicorn with 400/431 before the page sees them.
limit_request_line = 4094
limit_request_fields = 50
limit_request_field_size = 8190
# No runtime control socket (~/.gunicorn/gunicorn.ctl, shared by every gunicorn of the user): the
# page is managed by signals, as `make serve` and the tests do.
control_socket_disable = True


def on_starting(server) -> None:
    """In the master, before the workers fork: gunicorn's own error answers carry the page's
    security headers and echo nothing of the request."""
    if ROOT not in sys.path:  # `web`, whatever the working folder
        sys.path.insert(0, ROOT)
    from web import security

    security.install()
