"""Issue 19, item 10: a shared service that goes away during a step ends it with one line, at once.

The tracking server here is a real `mlflow server` on SQLite (no PostgreSQL needed), killed while
`train` logs to it; the catalogue database that stops during `populate` is simulated by the error
SQLAlchemy raises for a connection the server closed (psycopg's OperationalError)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from mlflow import MlflowClient
from sqlalchemy.exc import OperationalError

from steps import populate
from team import preflight
from team.preflight import HTTP_DEFAULTS
from tests.conftest import VENV_PATH, free_port, run_pipeline
from web.serve import wait_until_ready

ROOT = Path(__file__).resolve().parents[1]


def test_a_catalogue_database_lost_during_populate_is_one_line(tmp_path, monkeypatch, capsys):
    def lost(*args, **kwargs):
        raise OperationalError(
            "INSERT INTO images ...",
            {},
            psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly\n\tThis probably means ..."),
        )

    monkeypatch.setattr(populate, "populate", lost)
    assert populate.main(["--metadata", str(tmp_path / "m.csv"), "--db", "postgresql://animal@127.0.0.1:1/animal"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("populate: error: the catalogue database stopped answering (consuming input failed: server closed")
    assert "rolled back" in line and "make team-up" in line


def test_other_database_errors_are_not_hidden(tmp_path, monkeypatch):
    from sqlalchemy.exc import ProgrammingError

    def bug(*args, **kwargs):
        raise ProgrammingError("SELECT nonsense", {}, Exception("syntax error"))

    monkeypatch.setattr(populate, "populate", bug)
    with pytest.raises(ProgrammingError):
        populate.main(["--metadata", str(tmp_path / "m.csv")])


def test_an_artifact_download_the_server_refuses_is_one_line(monkeypatch, capsys):
    """MLflow's artifact proxy refuses through `requests` (an HTTPError, not an MlflowException): a
    step that may not read a model's files still ends in one line naming what it lacked."""
    import requests

    url = "http://127.0.0.1:1/api/2.0/mlflow-artifacts/artifacts?path=2%2Fmodels%2Fm-1%2Fartifacts"
    refused = requests.Response()
    refused.status_code, refused.url, refused.request = 403, url, requests.Request("GET", url).prepare()

    def download(*args, **kwargs):
        raise requests.HTTPError("403 Client Error: Forbidden", response=refused)

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "trainer-1")
    monkeypatch.setattr(preflight, "_experiment_name", lambda experiment_id: experiment_id)  # no server to ask
    monkeypatch.setattr(populate, "populate", download)
    assert populate.main(["--metadata", "m.csv", "--db", "c.db"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "populate: error: permission denied: trainer-1 may not read the artifacts of experiment 2 (needs READ on experiment 2)"


def test_the_tracking_server_killed_during_train_is_one_line_that_says_how_to_end_the_run(tmp_path):
    _, _, db = run_pipeline(tmp_path, images_per_class=12)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env = {**env, "PATH": VENV_PATH, "MLFLOW_TRACKING_URI": uri}
    server_command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    server_command += ["--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "art")]

    def start_server() -> subprocess.Popen:
        process = subprocess.Popen(
            server_command, env=env, cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        assert wait_until_ready(f"{uri}/health", process, timeout=180)
        return process

    server = start_server()
    train = subprocess.Popen(
        [sys.executable, "-m", "steps.train", "--db", str(db), "--image-size", "32", "--epochs", "500", "--batch-size", "8"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        client = MlflowClient(tracking_uri=uri)
        run = None
        for _ in range(600):  # until train has logged its first epoch to the server
            experiment = client.get_experiment_by_name("animal-faces")
            found = client.search_runs([experiment.experiment_id]) if experiment else []
            if found and found[0].data.metrics:
                run = found[0]
                break
            assert train.poll() is None, train.stderr.read()[-3000:]
            time.sleep(0.5)
        assert run is not None
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        # MLflow's defaults kept train retrying for 8.4 minutes; the bounded retries end it in seconds.
        _, stderr = train.communicate(timeout=120)
    finally:
        if train.poll() is None:
            train.kill()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGKILL)
    assert train.returncode == 2, stderr[-3000:]
    assert "Traceback" not in stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith(f"train: error: the MLflow tracking server {uri} is unreachable")
    assert f"its run {run.info.run_id} is left RUNNING" in line and "set_terminated" in line

    server = start_server()  # back: the line's command ends the run
    try:
        assert client.get_run(run.info.run_id).info.status == "RUNNING"
        command = line.split("end it with ", 1)[1]
        subprocess.run(command, shell=True, env=env, check=True, timeout=120)
        assert client.get_run(run.info.run_id).info.status == "FAILED"
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def test_the_retry_defaults_leave_a_users_settings_alone(monkeypatch):
    from team.preflight import bound_http_retries

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")
    for name in HTTP_DEFAULTS:
        if name != "MLFLOW_HTTP_REQUEST_MAX_RETRIES":
            monkeypatch.delenv(name, raising=False)
    bound_http_retries()
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"
    assert os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] == HTTP_DEFAULTS["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]
