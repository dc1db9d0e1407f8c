"""Slow clients against the page under gunicorn.conf.py: how many it outlasts, measured.

    python -m bench.slow_clients [--counts 2,8,12,16,24] [--asks 10]

Starts the page (web.serve.page_server, gunicorn.conf.py as it is) and, for each count, opens that
many slowloris connections (a request line, then one header line every second, never finished);
meanwhile a well-behaved client asks `GET /` `--asks` times with a 5 s timeout, and one upload
declares 100,000 bytes, sends 6 and stalls. Prints how many of the requests were answered, the
slowest answer, and when (seconds after its last byte) the stalled upload got its answer and which
(408 after UPLOAD_IDLE_TIMEOUT, 20 s, expected). The page needs no scoring server for either.
"""

from __future__ import annotations

import argparse
import http.client
import runpy
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.common import machine, table
from web.serve import free_port, page_server


def slowloris(port: int, stop: threading.Event) -> None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            while not stop.wait(1.0):
                sock.sendall(b"X-Slow: 1\r\n")
    except OSError:
        pass  # the page closed it


def stalled_upload(port: int, result: list[object]) -> None:
    """An upload that stops after its first bytes: appends (status, seconds from its last byte)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            b"POST /api/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=B\r\n\r\n--B\r\n"
        )
        sent = time.perf_counter()
        try:
            response = http.client.HTTPResponse(sock)
            response.begin()
            result += [response.status, time.perf_counter() - sent]
        except OSError as error:
            result += [type(error).__name__, time.perf_counter() - sent]


def trial(url: str, count: int, asks: int) -> list[object]:
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    threads = [threading.Thread(target=slowloris, args=(port, stop), daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # all of them connected and trickling
    stalled: list[object] = []
    upload = threading.Thread(target=stalled_upload, args=(port, stalled), daemon=True)
    upload.start()
    answered, slowest = 0, 0.0
    for _ in range(asks):
        started = time.perf_counter()
        try:
            answered += requests.get(f"{url}/", timeout=5, headers={"Connection": "close"}).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
        except requests.RequestException:
            slowest = max(slowest, time.perf_counter() - started)
    upload.join(timeout=60)  # the slow clients keep trickling until the stalled upload is answered
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    time.sleep(1)
    status, seconds = stalled if len(stalled) == 2 else ("none", float("nan"))
    return [count, f"{answered}/{asks}", slowest * 1000, status, seconds]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2,8,12,16,24")
    parser.add_argument("--asks", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, page_server(f"http://127.0.0.1:{free_port()}", log=Path(tmp) / "page.log") as page:
        rows = [trial(page.url, int(count), args.asks) for count in args.counts.split(",")]
    conf = runpy.run_path(str(Path(__file__).resolve().parents[1] / "gunicorn.conf.py"))  # what the page ran with
    table(
        f"GET / while slow clients trickle their headers (gunicorn.conf.py: {conf['workers']} workers x {conf['threads']} threads)",
        ["slow clients", "answered (5 s timeout)", "slowest ms", "stalled upload", "answered after s"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
