"""`make serve`: the scoring server and the upload page on the current Production model, in one command.

    python -m web.serve [--model models:/animal/Production] [--port 8000] [--scoring-port 5001]

Starts `mlflow models serve --env-manager local`, waits until it answers, then serves the page
(http://127.0.0.1:8000). Ctrl-C stops both. For production, see the README (gunicorn, build-docker).
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

DEFAULT_MODEL = "models:/animal/Production"


def port_is_free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex((host, port)) != 0


def start_scoring_server(model: str, host: str, port: int, workers: int) -> subprocess.Popen:
    env = dict(os.environ)
    # mlflow starts `uvicorn` by name: the venv's bin folder must come first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model, "-h", host, "-p", str(port),
               "-w", str(workers), "--env-manager", "local"]
    # Its own process group: we stop mlflow and the uvicorn workers it starts together.
    return subprocess.Popen(command, env=env, start_new_session=True)


def stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL_URI", DEFAULT_MODEL))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000, help="the page")
    parser.add_argument("--scoring-port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1, help="scoring server workers (about 780 MB each)")
    parser.add_argument("--wait", type=float, default=300, help="seconds to wait for the scoring server")
    args = parser.parse_args(argv)

    for port in (args.port, args.scoring_port):
        if not port_is_free(args.host, port):
            print(f"error: port {port} on {args.host} is in use (another `make serve`?)", file=sys.stderr)
            return 1
    # Ctrl-C and `kill` (SIGTERM) stop both servers, even when started in the background where
    # the shell makes us ignore SIGINT.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from werkzeug.serving import make_server

    from web.app import create_app

    scoring_url = f"http://{args.host}:{args.scoring_port}"
    print(f"starting the scoring server for {args.model} on {scoring_url} (loading the model takes a while)…",
          flush=True)
    scoring = start_scoring_server(args.model, args.host, args.scoring_port, args.workers)
    try:
        if not wait_until_ready(f"{scoring_url}/ping", scoring, args.wait):
            print(f"error: the scoring server did not start (exit code {scoring.poll()}). Is there a model "
                  f"at {args.model}? `make run` trains and promotes one.", file=sys.stderr)
            return 1
        app = create_app({"SCORING_URL": f"{scoring_url}/invocations"})
        page = make_server(args.host, args.port, app, threaded=True)
        # If the scoring server dies, stop the page too rather than answer 503 forever.
        threading.Thread(target=lambda: (scoring.wait(), page.shutdown()), daemon=True).start()
        print(f"\n  the page:           http://{args.host}:{args.port}\n"
              f"  the scoring server: {scoring_url}/invocations\n"
              f"  catalogue:          {app.config['ANIMAL_DB']}\n\nCtrl-C stops both.\n", flush=True)
        page.serve_forever()  # returns on Ctrl-C (werkzeug catches it) or when the scoring server stops
    except KeyboardInterrupt:
        pass
    finally:
        stopped_by_itself = scoring.poll() is not None
        stop(scoring)
    if stopped_by_itself:
        print(f"error: the scoring server stopped (exit code {scoring.returncode})", file=sys.stderr)
        return 1
    print("stopped both servers", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
