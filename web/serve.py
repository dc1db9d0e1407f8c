"""`make serve`: the scoring server and the upload page on the current Production model, in one command.

    python -m web.serve [--model models:/animal/Production] [--port 8000] [--scoring-port 5001]

Starts `mlflow models serve --env-manager local`, waits until it answers, then the page under
gunicorn with the repository's gunicorn.conf.py (http://127.0.0.1:8000). Ctrl-C stops both.

The one way the project starts, waits for and stops its servers: `make serve`, the test fixtures
and the benchmarks all use `scoring_server` / `page_server` (or `start_scoring_server` /
`start_page_server` to start several at once and wait afterwards).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import requests

from databases import catalogue
from databases.image_store import absolute
from steps import defaults
from web.model_info import served_version

ROOT = Path(__file__).resolve().parents[1]
GUNICORN_CONF = ROOT / "gunicorn.conf.py"
DEFAULT_MODEL = f"models:/{defaults.MODEL_NAME}/{defaults.STAGE}"


class ServerError(RuntimeError):
    """A server did not start or stopped; the message is one line that names what and why."""


@dataclass
class Served:
    """A server process in its own process group (stopped together with the workers it starts)."""

    name: str
    url: str
    process: subprocess.Popen
    ready_path: str
    log: Path | None
    _log_file: IO | None = None

    def wait(self, timeout: float = 300) -> None:
        """Return once the server answers; ServerError (one line) if it exits or `timeout` passes."""
        if wait_until_ready(f"{self.url}{self.ready_path}", self.process, timeout):
            return
        code = self.process.poll()
        why = f"exited with code {code}" if code is not None else f"did not answer within {timeout:g} s"
        last = last_line(self.log)
        raise ServerError(f"{self.name} {why}" + (f": {last}" if last else "") + (f" (log: {self.log})" if self.log else ""))

    def stop(self) -> None:
        stop(self.process)
        if self._log_file:
            self._log_file.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def server_env(**extra: str) -> dict:
    env = {**os.environ, **extra}
    # mlflow starts `uvicorn` by name: the venv's bin folder must come first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def _start(name: str, command: list[str], env: dict, url: str, ready_path: str, log: Path | None) -> Served:
    log_file = log.open("w") if log else None
    # Its own process group: the server and the workers it starts are stopped together.
    process = subprocess.Popen(
        command, cwd=ROOT, env=env, start_new_session=True, stdout=log_file, stderr=subprocess.STDOUT if log_file else None
    )
    return Served(name, url, process, ready_path, log, log_file)


def start_scoring_server(
    model_uri: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    tracking_uri: str | None = None,
    workers: int = 1,
    log: Path | None = None,
    timeout: int | None = None,
) -> Served:
    """`mlflow models serve` of `model_uri` on host:port (a free port if None), started, not waited for.
    `timeout`: the server's own limit per request in seconds (mlflow's default: 60)."""
    port = port or free_port(host)
    env = server_env(MLFLOW_TRACKING_URI=tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", defaults.TRACKING_URI))
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "models",
        "serve",
        "-m",
        model_uri,
        "-h",
        host,
        "-p",
        str(port),
        "-w",
        str(workers),
        "--env-manager",
        "local",
    ] + (["-t", str(timeout)] if timeout else [])
    return _start(f"the scoring server for {model_uri}", command, env, f"http://{host}:{port}", "/ping", log)


def start_page_server(
    scoring_url: str,
    port: int | None = None,
    host: str = "127.0.0.1",
    db: Path | str | None = None,
    image_store: Path | str | None = None,
    workers: int | None = None,
    threads: int | None = None,
    log: Path | None = None,
    **config: str,
) -> Served:
    """The page under gunicorn with gunicorn.conf.py, talking to `scoring_url` (base URL or
    .../invocations), started, not waited for. `config`: more of the page's settings (web/app.py)."""
    port = port or free_port(host)
    invocations = scoring_url if scoring_url.endswith("/invocations") else f"{scoring_url.rstrip('/')}/invocations"
    settings = {"SCORING_URL": invocations, **{key: str(value) for key, value in config.items()}}
    if db is not None:  # a SQLite file, or a postgresql:// URL (team layout)
        settings["ANIMAL_DB"] = str(db) if catalogue.is_url(db) else str(Path(db).resolve())
    if image_store is not None:  # a folder, or s3://bucket/prefix
        settings["IMAGE_STORE"] = str(absolute(image_store))
    command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "-b", f"{host}:{port}"]
    command += (["-w", str(workers)] if workers else []) + (["--threads", str(threads)] if threads else [])
    return _start("the page", command + ["web.app:app"], server_env(**settings), f"http://{host}:{port}", "/", log)


@contextmanager
def running(served: Served, wait: float) -> Iterator[Served]:
    """`served` once it answers (ServerError if it does not within `wait` s); stopped on exit."""
    try:
        served.wait(wait)
        yield served
    finally:
        served.stop()


def scoring_server(model_uri: str, port: int | None = None, wait: float = 300, **options):
    """A running `mlflow models serve` (options: see start_scoring_server), as a context manager."""
    return running(start_scoring_server(model_uri, port, **options), wait)


def page_server(scoring_url: str, port: int | None = None, wait: float = 60, **options):
    """The page running under gunicorn (options: see start_page_server), as a context manager."""
    return running(start_page_server(scoring_url, port, **options), wait)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def wait_until_ready(url: str, process: subprocess.Popen, timeout: float) -> bool:
    """True once `url` answers 200; False if the process exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(url, timeout=2).ok:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.5)
    return False


def last_line(log: Path | None) -> str:
    """The last line a server wrote (usually the exception that stopped it), shortened."""
    if not log or not log.is_file():
        return ""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_URI", DEFAULT_MODEL))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the page")
    parser.add_argument("--scoring-port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="scoring server workers (about 780 MB each)")
    parser.add_argument(
        "--image-store",
        default=os.environ.get("IMAGE_STORE", str(defaults.IMAGE_STORE)),
        help="where the page reads catalogue images: a folder or s3://bucket/prefix",
    )
    parser.add_argument("--db", default=os.environ.get("ANIMAL_DB", str(defaults.CATALOGUE)), help="the catalogue")
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for the scoring server")
    return parser


def serve(args: argparse.Namespace) -> str | None:
    """Both servers until Ctrl-C or until one of them stops; the error, if one stopped by itself."""
    with ExitStack() as stack:
        print(
            f"starting the scoring server for {args.model} on http://{args.host}:{args.scoring_port} (loading the model takes a while)…",
            flush=True,
        )
        scoring = stack.enter_context(scoring_server(args.model, args.scoring_port, wait=args.wait, host=args.host, workers=args.workers))
        # What is served is what was promoted: say which version that is and whose run made it.
        print(f"serving {served_version(args.model) or args.model}", flush=True)
        page = stack.enter_context(page_server(scoring.url, args.port, host=args.host, db=args.db, image_store=args.image_store))
        print(f"\n  the page:           {page.url}\n  the scoring server: {scoring.url}/invocations\n\nCtrl-C stops both.\n", flush=True)
        while scoring.process.poll() is None and page.process.poll() is None:
            time.sleep(0.5)
        stopped = scoring if scoring.process.poll() is not None else page
        return f"{stopped.name} stopped (exit code {stopped.process.returncode})"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for port in (args.port, args.scoring_port):
        if not port_is_free(args.host, port):
            print(f"error: port {port} on {args.host} is in use (another `make serve`?)", file=sys.stderr)
            return 1
    # Ctrl-C and `kill` (SIGTERM) stop both servers, even when started in the background where
    # the shell makes us ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        error = serve(args)
    except ServerError as failure:
        hint = f" Is there a model at {args.model}? `make run` trains and promotes one." if "scoring" in str(failure) else ""
        error = f"{failure}.{hint}"
    except KeyboardInterrupt:
        error = None
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("stopped both servers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
