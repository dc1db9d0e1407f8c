"""`python -m team` and its ports (issue 19): a taken port is named with the way out, `--postgres-port`
is honoured by a cluster that already exists (or refused in one line while it runs), and status and
down use the ports `up` used, kept in the team folder's settings.json. Marked `team` (PostgreSQL)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from team.cluster import TeamError, postgres_bin
from tests.conftest import VENV_PATH, free_port

pytestmark = pytest.mark.team
ROOT = Path(__file__).resolve().parents[1]


def team(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": VENV_PATH}
    return subprocess.run([sys.executable, "-m", "team", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.fixture()
def home():
    try:
        postgres_bin("initdb")
    except TeamError as error:
        pytest.skip(str(error))
    folder = Path(tempfile.mkdtemp(prefix="animal-team-"))  # not under pytest's 0700 folders: postgres must enter it
    folder.chmod(0o711)
    yield folder
    team("down", "--home", str(folder))
    shutil.rmtree(folder, ignore_errors=True)


def test_a_taken_postgres_port_is_named_with_the_way_out(home):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = team("up", "--home", str(home), "--postgres-port", str(port), "--port", str(free_port()))
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert f"port {port} on 127.0.0.1 is in use" in line and "--postgres-port" in line and "Examine the log" not in line


def test_status_and_down_use_the_ports_up_used_and_a_new_port_is_honoured(home):
    postgres, tracking = free_port(), free_port()
    up = team("up", "--home", str(home), "--postgres-port", str(postgres), "--port", str(tracking))
    assert up.returncode == 0, up.stderr[-2000:]
    assert json.loads((home / "settings.json").read_text()) == {"host": "127.0.0.1", "postgres_port": postgres, "tracking_port": tracking}

    status = team("status", "--home", str(home))  # no ports given: the ones up used
    assert f"PostgreSQL: running (port {postgres})" in status.stdout
    assert f"tracking server http://127.0.0.1:{tracking}: answers" in status.stdout

    other = free_port()
    refused = team("up", "--home", str(home), "--postgres-port", str(other))  # while it runs: one line
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert f"already running on port {postgres}, not {other}" in line and "team-down" in line

    assert team("down", "--home", str(home)).returncode == 0
    assert "PostgreSQL: stopped" in team("status", "--home", str(home)).stdout

    moved = team("up", "--home", str(home), "--postgres-port", str(other), "--port", str(tracking))  # the cluster exists
    assert moved.returncode == 0, moved.stderr[-2000:]
    assert f":{other}/animal" in (home / "team.env").read_text()
    status = team("status", "--home", str(home))
    assert f"PostgreSQL: running (port {other})" in status.stdout and "answers" in status.stdout
    with pytest.raises(OSError), socket.socket() as probe:  # PostgreSQL really listens there now
        probe.bind(("127.0.0.1", other))


def test_postgres_stopped_inside_a_write_is_one_line_and_nothing_half_written(home, capsys, monkeypatch):
    """The real error of a server that goes away in the middle of a transaction, through the same
    wrapper every step's main has: one line, and after a restart the catalogue holds nothing of it."""
    from databases import catalogue
    from team.cluster import Layout, _as_service_user, start_postgres
    from team.preflight import one_line_errors

    layout = Layout(home, "127.0.0.1", free_port(), free_port())
    start_postgres(layout)
    monkeypatch.setenv("PGPASSWORD", layout.password())
    url = layout.database_url("animal")
    row = {"sha256": "0" * 64, "path": "train/cat/a.jpg", "split": "train", "label": "cat", "width": 8, "height": 8, "bytes": 1}
    row |= {"source": "test", "attributes": "{}"}

    def write(argv: list[str] | None = None) -> int:
        conn = catalogue.connect(url)
        with catalogue.transaction(conn):
            catalogue.upsert_images(conn, [row])
            stop = [postgres_bin("pg_ctl"), "stop", "-D", str(layout.data), "-m", "immediate"]
            subprocess.run(_as_service_user(stop), check=True, capture_output=True)
        return 0

    assert one_line_errors("populate")(write)([]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("populate: error: the catalogue database stopped answering (") and "rolled back" in line
    start_postgres(layout)
    conn = catalogue.connect(url, readonly=True)
    assert catalogue.image_path(conn, 1) is None  # the insert was never committed
    conn.close()


def test_a_slow_postgresql_catalogue_is_cut_at_the_pages_time_limit(home, monkeypatch):
    """The page's CATALOGUE_TIMEOUT on PostgreSQL is its statement_timeout: an `images` view that
    sleeps 30 s makes /healthz say the catalogue is not readable instead of waiting for it."""
    import psycopg

    from team.cluster import Layout, start_postgres
    from web.app import create_app

    layout = Layout(home, "127.0.0.1", free_port(), free_port())
    start_postgres(layout)
    monkeypatch.setenv("PGPASSWORD", layout.password())
    with psycopg.connect(layout.database_url("animal"), autocommit=True) as conn:
        conn.execute("CREATE TABLE real_images (id INTEGER PRIMARY KEY, path TEXT)")
        conn.execute("INSERT INTO real_images VALUES (1, 'cat/a.jpg')")
        conn.execute("CREATE VIEW images AS SELECT r.id, r.path FROM real_images r CROSS JOIN LATERAL (SELECT pg_sleep(30)) s")
    page = create_app({"ANIMAL_DB": layout.database_url("animal"), "CATALOGUE_TIMEOUT": 1, "SCORING_URL": "http://127.0.0.1:9/invocations"})
    client = page.test_client()
    assert client.get("/healthz").json["catalogue"] == {"readable": False}
    assert client.get("/images/1").status_code == 503
