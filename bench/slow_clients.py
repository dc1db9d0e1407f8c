"""Slow clients against the page under gunicorn.conf.py: how many it outlasts, measured.

    python -m bench.slow_clients [--counts 2,8,12,16,24] [--asks 10]

Starts the page (web.serve.page_server, gunicorn.conf.py as it is) and, for each count, opens that
many slowloris connections (a request line, then one header line every second, never finished);
meanwhile a well-behaved client asks `GET /` `--asks` times with a 5 s timeout. Prints how many
of its requests were answered and the slowest answer. The page needs no scoring server for `/`.
"""

from __future__ import annotations

import argparse
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


def trial(url: str, count: int, asks: int) -> list[object]:
    port = int(url.rsplit(":", 1)[1])
    stop = threading.Event()
    threads = [threading.Thread(target=slowloris, args=(port, stop), daemon=True) for _ in range(count)]
    for thread in threads:
        thread.start()
    time.sleep(2)  # all of them connected and trickling
    answered, slowest = 0, 0.0
    for _ in range(asks):
        started = time.perf_counter()
        try:
            answered += requests.get(f"{url}/", timeout=5, headers={"Connection": "close"}).status_code == 200
            slowest = max(slowest, time.perf_counter() - started)
        except requests.RequestException:
            slowest = max(slowest, time.perf_counter() - started)
    stop.set()
    for thread in threads:
        thread.join(timeout=5)
    time.sleep(1)
    return [count, f"{answered}/{asks}", slowest * 1000]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", default="2,8,12,16,24")
    parser.add_argument("--asks", type=int, default=10)
    args = parser.parse_args(argv)
    print(f"machine: {machine()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp, page_server(f"http://127.0.0.1:{free_port()}", log=Path(tmp) / "page.log") as page:
        rows = [trial(page.url, int(count), args.asks) for count in args.counts.split(",")]
    table(
        "GET / while slow clients trickle their headers (gunicorn.conf.py: 2 workers x 8 threads)",
        ["slow clients", "answered (5 s timeout)", "slowest ms"],
        rows,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
