"""Team mode against real servers on loopback, started and stopped by this module: PostgreSQL (a private
cluster, started the way `make team-up` starts it), `mlflow server` on it with its login on (basic-auth:
the tests run as its admin unless they say whom) and its artifacts in an S3-protocol bucket, and that
object store (moto's server mode: the same boto3 calls reach AWS S3 or MinIO). Heavy, so marked `team`
(`pytest -m "not team"` leaves them out); kept small: 12 images per class, 32 px, 1-2 epochs, 2 tune
trials."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import pandas as pd
import pytest
import requests
from mlflow import MlflowClient

from databases import catalogue, image_store
from steps.extract import extract
from steps.populate import populate
from team.cluster import (
    ADMIN,
    READER,
    USER,
    WRITER,
    Layout,
    TeamError,
    catalogue_database,
    down,
    postgres_bin,
    start_postgres,
    start_tracking_server,
)
from tests.conftest import ROOT, TINY, VENV_PATH, free_port, run_distributed_tune
from web.serve import wait_until_ready

pytestmark = pytest.mark.team

AWS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKETS = ("images", "artifacts")
LABELS = {"cat", "dog", "wild"}


# --- the servers ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a loopback port, with the buckets `images` and `artifacts`; the AWS
    variables point this process (and every process it starts) at it."""
    port = free_port()
    log = (tmp_path_factory.mktemp("s3") / "moto.log").open("w")
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        wait_for(f"{endpoint}/moto-api/", process, timeout=60)
        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**AWS, "AWS_ENDPOINT_URL": endpoint}.items():
                patch.setenv(name, value)
            patch.delenv("MLFLOW_S3_ENDPOINT_URL", raising=False)
            client = boto3.client("s3", endpoint_url=endpoint)
            for bucket in BUCKETS:
                client.create_bucket(Bucket=bucket)
            yield client
    finally:
        process.terminate()
        process.wait(timeout=20)
        log.close()


@pytest.fixture(scope="module")
def team(s3):
    """PostgreSQL and `mlflow server` (artifacts in s3://artifacts/mlflow), as `make team-up` starts them;
    this process talks to them as the admin and the catalogue's writer."""
    try:
        postgres_bin("initdb")
    except TeamError as error:
        pytest.skip(str(error))
    # Not under pytest's folders: those are 0700, and PostgreSQL runs as the postgres user.
    home = Path(tempfile.mkdtemp(prefix="animal-team-"))
    home.chmod(0o711)
    layout = Layout(home, "127.0.0.1", free_port(), free_port())
    try:
        start_postgres(layout)
        start_tracking_server(layout, "s3://artifacts/mlflow", workers=2, timeout=300)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("PGPASSWORD", layout.password(WRITER))  # in-process catalogue connections
            patch.setenv("MLFLOW_TRACKING_USERNAME", ADMIN)  # in-process MlflowClients
            patch.setenv("MLFLOW_TRACKING_PASSWORD", layout.user_password(ADMIN))
            yield layout
    finally:
        down(layout)
        shutil.rmtree(home, ignore_errors=True)


def wait_for(url: str, process: subprocess.Popen, timeout: float) -> None:
    assert wait_until_ready(url, process, timeout), f"{url} did not answer (exit code {process.poll()})"


def fresh_database(team: Layout, name: str) -> str:
    """An empty catalogue database on the team's cluster, as `team up` makes `animal`: owned by the
    writer, readable by the reader; its URL for the writer (password from PGPASSWORD)."""
    import psycopg

    with psycopg.connect(team.database_url("postgres", password=True), autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {}").format(psycopg.sql.Identifier(name)))
    return catalogue_database(team, name)


def team_env(team: Layout, experiment: str = "team", **extra: str) -> dict[str, str]:
    """A client process's environment: the team's servers, none of the test session's own store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    return {**env, **team.client_environment(), "MLFLOW_EXPERIMENT_NAME": experiment, "PATH": VENV_PATH, "PYTHONPATH": str(ROOT), **extra}


def run(command: list[str], env: dict, cwd: Path, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command[:6])}...\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def mlflow_run(entry_point: str, parameters: dict, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mlflow", "run", str(ROOT), "-e", entry_point, "--env-manager", "local"]
    for name, value in parameters.items():
        command += ["-P", f"{name}={value}"]
    return run(command, env, cwd)


def team_cli(team: Layout, *words: str) -> subprocess.CompletedProcess:
    """`python -m team ...` for this installation, as the admin who ran `team up` would."""
    args = ["--home", str(team.home), "--postgres-port", str(team.postgres_port), "--port", str(team.tracking_port)]
    return run([sys.executable, "-m", "team", *words, *args], {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT)


def env_file_values(path: Path) -> dict[str, str]:
    """The variables of an env file `team user add` wrote (`export NAME=value` lines)."""
    lines = [line.removeprefix("export ") for line in path.read_text().splitlines() if line.startswith("export ")]
    return dict(line.split("=", 1) for line in lines)


@pytest.fixture(scope="module")
def people(team):
    """One person per role, made with `python -m team user add`: role -> their environment file's
    variables (tracking login, catalogue URL and password of their catalogue role)."""
    made = {}
    for role in ("reader", "trainer", "releaser"):
        added = team_cli(team, "user", "add", f"{role}-1", "--role", role)
        assert f"{role}-1 added as {role}" in added.stdout
        made[role] = env_file_values(team.users_dir / f"{role}-1.env")
    return made


def as_person(team: Layout, people: dict, role: str, database: str, **extra: str) -> dict[str, str]:
    """A client process's environment for `role`'s person, their catalogue role on `database`."""
    values = people[role]
    url = values["ANIMAL_DB"].rsplit("/", 1)[0] + f"/{database}"
    return team_env(team, **{**values, "ANIMAL_DB": url, **extra})


def tracking_files() -> dict[str, float | None]:
    """The local tracking files a misdirected run would create (mtime, or None if absent)."""
    places = [ROOT / name for name in ("mlruns", "mlflow.db", "mlartifacts")]
    return {str(p): (p.stat().st_mtime if p.exists() else None) for p in places}


# --- the catalogue on PostgreSQL, the image store on S3 --------------------------------------------


def test_catalogue_on_postgres_holds_what_sqlite_holds(team, tmp_path):
    images, metadata = tmp_path / "images", tmp_path / "metadata.csv"
    extract("synthetic", images, metadata, images_per_class=4, seed=3)
    url = fresh_database(team, "same_as_sqlite")
    on_sqlite, on_postgres = populate(metadata, images, tmp_path / "c.db"), populate(metadata, images, url)
    assert on_postgres.inserted == on_sqlite.inserted == 12
    again = populate(metadata, images, url)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 12)

    sqlite_conn, conn = catalogue.connect(tmp_path / "c.db", readonly=True), catalogue.connect(url, readonly=True)
    try:
        columns = ["sha256", "path", "split", "label", "width", "height", "bytes", "source", "attributes", "file"]
        frames = [catalogue.images(c)[columns].sort_values("sha256", ignore_index=True) for c in (sqlite_conn, conn)]
        pd.testing.assert_frame_equal(*frames, check_dtype=False)
        assert catalogue.content_hash(conn) == catalogue.content_hash(sqlite_conn)
        assert catalogue.store_root(conn) == images.resolve()
        first = int(catalogue.images(conn, split="val").id.iloc[0])
        assert catalogue.image_bytes(conn, first) == (images / catalogue.image_key(conn, first)).read_bytes()
        assert catalogue.image_key(conn, 10**9) is None and catalogue.image_key(conn, 2**63) is None
        with pytest.raises(Exception, match="read-only"):
            conn.exec_driver_sql("DELETE FROM images")
    finally:
        sqlite_conn.close()
        conn.close()

    writer = catalogue.connect(url)
    try:
        row = {
            "sha256": "a" * 64,
            "path": "../../etc/passwd",
            "split": "train",
            "label": "cat'; DROP TABLE images;--",
            "width": 1,
            "height": 1,
            "bytes": 1,
            "source": "test",
            "attributes": {},
        }
        assert catalogue.upsert_images(writer, [row]).inserted == 1
        tampered = catalogue.images(writer).set_index("sha256").loc["a" * 64]
        assert tampered.label == "cat'; DROP TABLE images;--"  # data, not SQL
        assert catalogue.image_key(writer, int(tampered.id)) is None  # a path out of the store names nothing
        assert catalogue.image_bytes(writer, int(tampered.id)) is None
    finally:
        writer.close()

    with pytest.raises(catalogue.CatalogueMissing, match="run the populate step"):
        catalogue.connect(fresh_database(team, "empty"), readonly=True)


def test_image_store_on_s3(s3, tmp_path, monkeypatch):
    store = image_store.open_store("s3://images/unit/")
    assert str(store) == "s3://images/unit" and store.read("train/cat/none.jpg") is None
    store.write("train/cat/a.jpg", b"cat")
    assert store.read("train/cat/a.jpg") == b"cat" and store.location("train/cat/a.jpg") == "s3://images/unit/train/cat/a.jpg"
    assert image_store.read_location("s3://images/unit/train/cat/a.jpg") == b"cat"
    assert s3.get_object(Bucket="images", Key="unit/train/cat/a.jpg")["Body"].read() == b"cat"  # where AWS would have it
    for outside in ("../a.jpg", "/train/cat/a.jpg", "train//a.jpg", "train/./a.jpg", "train\\a.jpg", ""):
        assert store.read(outside) is None and store.sha256(outside) is None
        with pytest.raises(image_store.StoreError, match="outside the image store"):
            store.write(outside, b"x")

    # extract -> s3, populate -> catalogue: keys relative to the store, readers read through it
    metadata, db = tmp_path / "metadata.csv", tmp_path / "c.db"
    report = extract("synthetic", "s3://images/pipeline", metadata, images_per_class=3, seed=4)
    assert report.written == 9 and extract("synthetic", "s3://images/pipeline", metadata, images_per_class=3, seed=4).unchanged == 9
    assert populate(metadata, "s3://images/pipeline", db).inserted == 9
    conn = catalogue.connect(db, readonly=True)
    try:
        assert catalogue.store_root(conn) == "s3://images/pipeline"
        frame = catalogue.images(conn)
        assert all(f.startswith("s3://images/pipeline/") for f in frame.file)
        assert image_store.read_location(frame.file.iloc[0])[:2] == b"\xff\xd8"  # a JPEG
        assert catalogue.image_file(conn, int(frame.id.iloc[0])) is None  # not a local file
        assert catalogue.image_bytes(conn, int(frame.id.iloc[0]))[:2] == b"\xff\xd8"
    finally:
        conn.close()
    s3.delete_object(Bucket="images", Key=f"pipeline/{frame.path.iloc[0]}")
    assert "file missing from the image store" in populate(metadata, "s3://images/pipeline", db).rejected[0]

    with pytest.raises(image_store.StoreError, match="bucket 'no-such-bucket' does not exist"):
        image_store.open_store("s3://no-such-bucket/x").read("a.jpg")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(image_store.StoreError, match="is unreachable at http://127.0.0.1"):
        image_store.open_store("s3://images/unit").read("train/cat/a.jpg")


def test_two_populates_at_once_store_each_image_once(team, tmp_path):
    """Two `populate` processes on overlapping CSVs, made to start together: the test holds a lock on
    the table until both are inside their transactions, waiting."""
    metadata = tmp_path / "all.csv"
    extract("synthetic", "s3://images/concurrent", metadata, images_per_class=TINY["images_per_class"], seed=5)
    rows = pd.read_csv(metadata)
    half = tmp_path / "half.csv"
    rows.iloc[::2].to_csv(half, index=False)
    url = fresh_database(team, "concurrent")
    catalogue.connect(url).close()  # the tables exist: the lock below has something to hold

    from sqlalchemy import text

    holder = catalogue._engine(url, readonly=False).connect()
    holder.execute(text("LOCK TABLE images IN EXCLUSIVE MODE"))
    env = team_env(team)
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "steps.populate", "--metadata", str(csv), "--image-store", "s3://images/concurrent", "--db", url],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for csv in (metadata, half)
    ]
    try:
        deadline = time.monotonic() + 300
        waiting = 0
        while waiting < 2 and time.monotonic() < deadline and all(p.poll() is None for p in processes):
            time.sleep(0.2)
            holder.execute(text("SELECT pg_stat_clear_snapshot()"))  # statistics views are frozen per transaction
            waiting = holder.execute(
                text(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = 'concurrent' "
                    "AND application_name = 'animal-faces' AND wait_event_type = 'Lock'"
                )
            ).scalar()
        assert waiting == 2, "both populates should be waiting on the table at once"
    finally:
        holder.commit()
        holder.close()
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], outputs
    inserted = [int(out.split("populate: ")[1].split(" inserted")[0]) for out, _ in outputs]
    assert sum(inserted) == len(rows)  # every image inserted exactly once, by one of the two

    conn = catalogue.connect(url, readonly=True)
    try:
        frame = catalogue.images(conn)
    finally:
        conn.close()
    assert len(frame) == len(rows) and frame.sha256.is_unique and set(frame.sha256) == set(rows.sha256)


# --- the whole pipeline against the servers ---------------------------------------------------------


@pytest.fixture(scope="module")
def team_pipeline(team, s3, tmp_path_factory):
    """`mlflow run .` (main: extract to s3://images/e2e -> populate on PostgreSQL -> train ->
    register + promote) against the tracking server, from an empty working folder, as the admin, in
    the project's experiment (where `team user add` grants the people their roles)."""
    work = tmp_path_factory.mktemp("team-work")
    before = tracking_files()
    url = fresh_database(team, "e2e")
    env = team_env(team, experiment="animal-faces")
    mlflow_run(
        "main",
        {
            "source": "synthetic",
            "image_store": "s3://images/e2e",
            "data_dir": work,
            "db": url,
            "images_per_class": TINY["images_per_class"],
            "seed": 7,
            "image_size": TINY["image_size"],
            "epochs": TINY["epochs"],
        },
        env,
        work,
    )
    assert not (work / "images").exists()  # the images went to the bucket only
    client = MlflowClient(team.tracking_uri())
    experiment = client.get_experiment_by_name("animal-faces")
    trained = client.search_runs([experiment.experiment_id], "tags.model_uri != ''", max_results=1)[0]
    return {"work": work, "db": url, "client": client, "experiment": experiment, "train_run": trained, "env": env, "before": before}


def test_pipeline_runs_against_the_servers_and_writes_no_local_tracking_files(team_pipeline, team, s3):
    client, url = team_pipeline["client"], team_pipeline["db"]
    version = client.get_model_version_by_alias("animal", "production")
    assert version.current_stage == "Production" and version.run_id == team_pipeline["train_run"].info.run_id
    conn = catalogue.connect(url, readonly=True)
    try:
        assert version.tags["catalogue_sha256"] == catalogue.content_hash(conn)
        assert len(catalogue.images(conn)) == 3 * TINY["images_per_class"]
    finally:
        conn.close()
    runs = client.search_runs([team_pipeline["experiment"].experiment_id])
    assert len(runs) >= 4 and all(r.info.status == "FINISHED" for r in runs)
    everything_logged = json.dumps([r.data.params for r in runs] + [r.data.tags for r in runs])
    assert team.password(WRITER) not in everything_logged  # URLs carry no password; libpq takes PGPASSWORD
    assert s3.list_objects_v2(Bucket="artifacts", Prefix="mlflow/")["KeyCount"] > 0  # proxied to the bucket
    # Nothing went to local tracking files: not in the working folder, not in the project.
    work = team_pipeline["work"]
    assert not any((work / name).exists() for name in ("mlruns", "mlflow.db", "mlartifacts"))
    assert tracking_files() == team_pipeline["before"]


def test_served_from_the_servers_registry(team_pipeline, team, people, tmp_path, monkeypatch, caplog):
    """The scoring server and the page as the reader: its tracking login and the catalogue's reader role."""
    reader = as_person(team, people, "reader", "e2e")
    port, url = free_port(), reader["ANIMAL_DB"]
    for name in ("PGPASSWORD", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, reader[name])  # the page, in this process
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "models",
            "serve",
            "-m",
            "models:/animal@production",
            "-p",
            str(port),
            "-h",
            "127.0.0.1",
            "--env-manager",
            "local",
            "-w",
            "1",
        ],
        cwd=team_pipeline["work"],
        env=reader,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_for(f"http://127.0.0.1:{port}/ping", process, timeout=300)
        conn = catalogue.connect(url, readonly=True)
        try:
            val = catalogue.images(conn, split="val")
        finally:
            conn.close()
        import base64

        photo = base64.b64encode(image_store.read_location(val.file.iloc[0])).decode()
        response = requests.post(
            f"http://127.0.0.1:{port}/invocations",
            timeout=120,
            json={"dataframe_split": {"columns": ["image"], "data": [[photo]]}, "params": {"k": 3}},
        )
        assert response.status_code == 200, response.text
        answer = response.json()["predictions"][0]
        assert answer["label"] in LABELS and answer["error"] is None
        assert answer["similar"] and {s["id"] for s in answer["similar"]} <= set(catalogue_ids(url))

        # One upload through the page: catalogue on PostgreSQL, images from the bucket.
        from web.app import create_app

        page = create_app(
            {"ANIMAL_DB": url, "IMAGE_STORE": "s3://images/e2e", "SCORING_URL": f"http://127.0.0.1:{port}/invocations"}
        ).test_client()
        upload = image_store.read_location(val.file.iloc[0])
        shown = page.post("/predict", data={"image": (io.BytesIO(upload), "photo.jpg")}, content_type="multipart/form-data")
        assert shown.status_code == 200, shown.text
        similar = [int(i) for i in re.findall(r'src="/images/(\d+)"', shown.text)]
        assert similar and set(similar) <= set(catalogue_ids(url))
        served = page.get(f"/images/{similar[0]}")
        conn = catalogue.connect(url, readonly=True)
        try:
            assert served.status_code == 200 and served.data == catalogue.image_bytes(conn, similar[0])
        finally:
            conn.close()
        assert page.get("/images/999999").status_code == 404
        assert page.get("/healthz").get_json()["catalogue"]["readable"] is True

        # What is served is what was promoted: the launcher and the page say which version, whose run.
        from web.model_info import ModelInfo, served_version

        trained = team_pipeline["train_run"]
        production = team_pipeline["client"].get_model_version_by_alias("animal", "production")
        expected = f"animal version {production.version} (run {trained.info.run_id}, by {ADMIN})"
        assert served_version("models:/animal@production", team.tracking_uri()) == expected
        assert served_version("models:/animal/Production", team.tracking_uri()) == expected
        with caplog.at_level(logging.INFO, logger="web.model_info"):  # the page's own ModelInfo, read afresh
            facts, problem = ModelInfo(team.tracking_uri()).facts()
        assert problem is None and facts["model"]["version"] == production.version
        assert f"the page describes animal version {production.version} (run {trained.info.run_id}, by {ADMIN})" in caplog.text
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert not any((team_pipeline["work"] / name).exists() for name in ("mlruns", "mlflow.db"))


def test_batch_scoring_with_the_servers_model(team_pipeline, team, people, tmp_path):
    """`score` on a folder of photos, with models:/animal@production from the tracking server, as the reader."""
    photos = tmp_path / "photos"
    photos.mkdir()
    conn = catalogue.connect(team_pipeline["db"], readonly=True)
    try:
        for row in catalogue.images(conn, split="val").head(3).itertuples():
            (photos / f"{row.id}.jpg").write_bytes(image_store.read_location(row.file))
    finally:
        conn.close()
    output = tmp_path / "scores.csv"
    reader = as_person(team, people, "reader", "e2e")
    run([sys.executable, "-m", "steps.score", "--input", str(photos), "--output", str(output)], reader, tmp_path)
    scores = pd.read_csv(output)
    assert len(scores) == 3 and set(scores.label) <= LABELS and scores.error.isna().all()
    assert not any((tmp_path / name).exists() for name in ("mlruns", "mlflow.db"))


def catalogue_ids(url: str) -> list[int]:
    conn = catalogue.connect(url, readonly=True)
    try:
        return catalogue.images(conn).id.tolist()
    finally:
        conn.close()


def test_a_failed_register_leaves_the_registry_as_it_was(team_pipeline, team, monkeypatch):
    """The catalogue names images in a bucket that is gone: register fails while evaluating, after it
    created the version; the version (and the model it created) are removed again."""
    url = fresh_database(team, "gone")
    conn = catalogue.connect(url)
    try:
        with catalogue.transaction(conn):
            catalogue.set_store_root(conn, "s3://no-such-bucket/images")
            catalogue.upsert_images(
                conn,
                [
                    {
                        "sha256": "b" * 64,
                        "path": "val/cat/x.jpg",
                        "split": "val",
                        "label": "cat",
                        "width": 1,
                        "height": 1,
                        "bytes": 1,
                        "source": "t",
                        "attributes": {},
                    }
                ],
            )
    finally:
        conn.close()
    client = team_pipeline["client"]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "steps.register",
            "--model-uri",
            team_pipeline["train_run"].data.tags["model_uri"],
            "--db",
            url,
            "--name",
            "animal-failing",
        ],
        cwd=team_pipeline["work"],
        env=team_pipeline["env"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("register: error: the image store s3://no-such-bucket")
    assert client.search_model_versions("name = 'animal-failing'") == []
    assert not client.search_registered_models("name = 'animal-failing'")
    assert client.get_model_version_by_alias("animal", "production").version == "1"


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_failed_populate_leaves_the_catalogue_as_it_was(database, request, tmp_path, monkeypatch):
    images, metadata = tmp_path / "images", tmp_path / "metadata.csv"
    extract("synthetic", images, metadata, images_per_class=4, seed=8)
    rows = pd.read_csv(metadata)
    first = tmp_path / "first.csv"
    rows.iloc[:5].to_csv(first, index=False)
    url = fresh_database(request.getfixturevalue("team"), "midway") if database == "postgresql" else tmp_path / "c.db"
    populate(first, images, url)
    conn = catalogue.connect(url, readonly=True)
    before = (catalogue.content_hash(conn), catalogue.store_root(conn), len(catalogue.images(conn)))
    conn.close()

    real, calls = catalogue._column_value, []

    def dies_midway(row, column):
        calls.append(column)
        if len(calls) > 4 * len(catalogue.COLUMNS):  # after some rows are written
            raise ConnectionError("the database went away")
        return real(row, column)

    monkeypatch.setattr(catalogue, "_column_value", dies_midway)
    shutil.copytree(images, tmp_path / "elsewhere")
    with pytest.raises(ConnectionError):
        populate(metadata, tmp_path / "elsewhere", url)  # a different store root, too
    monkeypatch.undo()
    conn = catalogue.connect(url, readonly=True)
    try:
        assert (catalogue.content_hash(conn), catalogue.store_root(conn), len(catalogue.images(conn))) == before
    finally:
        conn.close()


def test_distributed_tune_against_the_server(team, tmp_path):
    """A chief and two workers (KerasTuner over gRPC on loopback), 2 trials of 1 epoch, catalogue on
    PostgreSQL, images in the bucket, every trial a child run on the tracking server."""
    metadata = tmp_path / "metadata.csv"
    extract("synthetic", "s3://images/tune", metadata, images_per_class=TINY["images_per_class"], seed=9)
    url = fresh_database(team, "tune")
    populate(metadata, "s3://images/tune", url)
    directory = tmp_path / "tuning"
    command = [
        sys.executable,
        "-m",
        "steps.tune",
        "--db",
        url,
        "--max-trials",
        "2",
        "--epochs",
        "1",
        "--image-size",
        str(TINY["image_size"]),
        "--tuner",
        "random",
        "--directory",
        str(directory),
    ]
    env = team_env(
        team, experiment="team-tune", KERASTUNER_ORACLE_IP="127.0.0.1", KERASTUNER_ORACLE_PORT=str(free_port()), PYTHONUNBUFFERED="1"
    )
    from steps.tune import STATE_FILE

    state_file = directory / "random" / STATE_FILE
    run_distributed_tune(command, env, cwd=tmp_path, logs_dir=tmp_path, state_file=state_file, timeout=900)

    client = MlflowClient(team.tracking_uri())
    parent_id = json.loads(state_file.read_text())["parent_run_id"]
    parent = client.get_run(parent_id)
    trials = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    trials = [t for t in trials if "trial_id" in t.data.tags]
    assert sorted(t.data.tags["trial_id"] for t in trials) == ["0", "1"]
    assert {t.info.status for t in trials} == {"FINISHED"}
    assert {t.data.tags["tuner_id"] for t in trials} <= {"tuner0", "tuner1"}
    assert client.search_model_versions(f"name = 'animal' AND run_id = '{parent_id}'")
    assert not any((tmp_path / name).exists() for name in ("mlruns", "mlflow.db"))


# --- a server down: one line that says what and how to start it ----------------------------------------


def test_one_line_errors_when_a_server_is_down(s3, tmp_path, monkeypatch):
    images, metadata = tmp_path / "images", tmp_path / "metadata.csv"
    extract("synthetic", images, metadata, images_per_class=2, seed=1)
    dead = f"127.0.0.1:{free_port()}"
    base = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    base = {**base, "PATH": VENV_PATH, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'm.db'}"}
    cases = {
        "tracking server": (
            [
                sys.executable,
                "-m",
                "steps.populate",
                "--metadata",
                str(metadata),
                "--image-store",
                str(images),
                "--db",
                str(tmp_path / "c.db"),
            ],
            {"MLFLOW_TRACKING_URI": f"http://{dead}"},
            f"populate: error: the MLflow tracking server http://{dead} is unreachable",
        ),
        "postgres": (
            [
                sys.executable,
                "-m",
                "steps.populate",
                "--metadata",
                str(metadata),
                "--image-store",
                str(images),
                "--db",
                f"postgresql://animal@{dead}/animal",
            ],
            {},
            f"populate: error: the catalogue database postgresql://animal@{dead}/animal is unreachable",
        ),
        "object store": (
            [
                sys.executable,
                "-m",
                "steps.extract",
                "--image-store",
                "s3://images/down",
                "--metadata",
                str(tmp_path / "m.csv"),
                "--images-per-class",
                "2",
            ],
            {"AWS_ENDPOINT_URL": f"http://{dead}"},
            "extract: error: the image store s3://images/down is unreachable",
        ),
        "tracking server, train": (
            [sys.executable, "-m", "steps.train", "--db", str(tmp_path / "c.db")],
            {"MLFLOW_TRACKING_URI": f"http://{dead}"},
            f"train: error: the MLflow tracking server http://{dead} is unreachable",
        ),
    }
    processes = {
        name: subprocess.Popen(command, env={**base, **env}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, (command, env, _) in cases.items()
    }
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=600)
        last = stderr.strip().splitlines()[-1]
        assert process.returncode == 2 and "Traceback" not in stderr, (name, stderr[-2000:])
        assert last.startswith(cases[name][2]), (name, last)
        if name != "object store":
            assert "make team-up" in last, (name, last)

    # The page: catalogue database or object store down is a 503 page, never a trace.
    from web.app import create_app

    page = create_app(
        {"ANIMAL_DB": f"postgresql://animal@{dead}/animal", "IMAGE_STORE": "s3://images/down", "SCORING_URL": f"http://{dead}/invocations"}
    ).test_client()
    assert page.get("/images/1").status_code == 503 and b"Traceback" not in page.get("/images/1").data
    assert page.get("/healthz").get_json()["catalogue"]["readable"] is False
    populate(metadata, images, tmp_path / "c.db")
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://{dead}")
    page = create_app(
        {"ANIMAL_DB": str(tmp_path / "c.db"), "IMAGE_STORE": "s3://images/down", "SCORING_URL": f"http://{dead}/invocations"}
    ).test_client()
    assert page.get("/images/1").status_code == 503


def test_team_status_and_schema_upgrade(team):
    """`python -m team status` sees both servers; `mlflow db upgrade` (the upgrade runbook's step) runs
    against the live tracking database and, on a current schema, changes nothing."""
    from team.cluster import upgrade_schema

    args = ["--home", str(team.home), "--postgres-port", str(team.postgres_port), "--port", str(team.tracking_port)]
    status = run([sys.executable, "-m", "team", "status", *args], {**os.environ, "PYTHONPATH": str(ROOT)}, ROOT)
    assert "PostgreSQL: running" in status.stdout and "answers" in status.stdout
    upgrade_schema(team)
    assert requests.get(f"{team.tracking_uri()}/health", timeout=10).status_code == 200
    assert MlflowClient(team.tracking_uri()).search_experiments()


# --- who may do what: the tracking server's logins, the catalogue's roles, the secrets ------------


def test_anonymous_and_wrong_logins_are_refused(team, tmp_path):
    uri, search = team.tracking_uri(), "/api/2.0/mlflow/experiments/search?max_results=1"
    for path in (search, "/ajax-api/2.0/mlflow/experiments/search?max_results=1", "/"):
        assert requests.get(f"{uri}{path}", timeout=30).status_code == 401, path  # the REST API and the UI
    assert requests.get(f"{uri}{search}", auth=(ADMIN, "not-the-password"), timeout=30).status_code == 401
    assert requests.get(f"{uri}{search}", auth=(ADMIN, team.user_password(ADMIN)), timeout=30).status_code == 200
    assert requests.get(f"{uri}/health", timeout=30).status_code == 200  # what `team status` and the steps ask first

    # A step without a login stops with one line that says how to log in.
    env = {k: v for k, v in team_env(team).items() if k not in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
    result = subprocess.run(
        [sys.executable, "-m", "steps.promote", "--version", "1", "--db", team.database_url("animal", role=WRITER)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"promote: error: the MLflow tracking server {uri} did not accept the login of an anonymous client"), last


def use_login(monkeypatch, people: dict, role: str) -> MlflowClient:
    """This process's MlflowClients log in as `role`'s person from now on."""
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", people[role]["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", people[role]["MLFLOW_TRACKING_PASSWORD"])
    return MlflowClient(people[role]["MLFLOW_TRACKING_URI"])


def refused(call) -> int:
    """The HTTP status the tracking server refused `call` with."""
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException) as error:
        call()
    return error.value.get_http_status_code()


def test_a_reader_reads_a_trainer_registers_only_a_releaser_promotes(team_pipeline, team, people, tmp_path, monkeypatch):
    admin = team_pipeline["client"]
    trained = team_pipeline["train_run"]
    model_uri, run_id = trained.data.tags["model_uri"], trained.info.run_id
    experiment = team_pipeline["experiment"]  # animal-faces, where the people have their roles
    # Production back on the pipeline's own version: the distributed tune test may have promoted its
    # best model, whose files lie in its own experiment, where these people have no role.
    (pipeline_version,) = admin.search_model_versions(f"name = 'animal' AND run_id = '{run_id}'")
    current = admin.get_model_version_by_alias("animal", "production")
    if current.version != pipeline_version.version:
        admin.transition_model_version_stage("animal", pipeline_version.version, "Production")
        admin.transition_model_version_stage("animal", current.version, "Archived")
        admin.set_registered_model_alias("animal", "production", pipeline_version.version)
    before = admin.get_model_version_by_alias("animal", "production")

    reader = use_login(monkeypatch, people, "reader")
    assert reader.get_model_version_by_alias("animal", "production").version == before.version
    assert reader.get_run(run_id).info.status == "FINISHED"
    assert refused(lambda: reader.create_run(experiment.experiment_id)) == 403
    assert refused(lambda: reader.create_experiment("readers-own")) == 403  # nor in an experiment of their own
    assert refused(lambda: reader.create_model_version("animal", model_uri, run_id)) == 403
    assert refused(lambda: reader.set_registered_model_alias("animal", "production", before.version)) == 403

    trainer = use_login(monkeypatch, people, "trainer")
    own = trainer.create_run(experiment.experiment_id)
    trainer.log_param(own.info.run_id, "lr", "0.001")
    trainer.set_terminated(own.info.run_id)
    version = trainer.create_model_version("animal", model_uri, run_id, model_id=model_uri.removeprefix("models:/")).version
    trainer.set_model_version_tag("animal", version, "by", "trainer-1")
    assert refused(lambda: trainer.set_registered_model_alias("animal", "production", version)) == 403
    assert refused(lambda: trainer.transition_model_version_stage("animal", version, "Production")) == 403
    assert refused(lambda: trainer.rename_registered_model("animal", "animal-moved")) == 403
    assert refused(lambda: trainer.delete_registered_model_alias("animal", "production")) == 403
    assert refused(lambda: trainer.create_registered_model("trainers-own")) == 403

    # The promote step as the trainer: one line naming the permission; Production stays where it was.
    promote = [sys.executable, "-m", "steps.promote", "--version", version, "--force", "true"]
    denied = subprocess.run(
        [*promote, "--db", team.database_url("e2e", role=WRITER)],
        env=as_person(team, people, "trainer", "e2e", MLFLOW_EXPERIMENT_NAME="animal-faces"),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert denied.returncode == 2 and "Traceback" not in denied.stderr, denied.stderr[-3000:]
    assert denied.stderr.strip().splitlines()[-1] == (
        "promote: error: permission denied: trainer-1 may not move production of registered model animal "
        "(needs MANAGE on registered model animal)"
    )
    assert admin.get_model_version_by_alias("animal", "production").version == before.version

    # As the releaser (the catalogue's reader is enough for the gate): promoted.
    releaser_env = as_person(team, people, "releaser", "e2e", MLFLOW_EXPERIMENT_NAME="animal-faces")
    promoted = run([*promote, "--db", releaser_env["ANIMAL_DB"]], releaser_env, tmp_path)
    assert f"promote: animal version {version}: " in promoted.stdout
    now = admin.get_model_version_by_alias("animal", "production")
    assert now.version == version and now.current_stage == "Production"

    releaser = use_login(monkeypatch, people, "releaser")  # and back, through the API
    releaser.transition_model_version_stage("animal", before.version, "Production")
    releaser.transition_model_version_stage("animal", version, "Archived")
    releaser.set_registered_model_alias("animal", "production", before.version)
    assert admin.get_model_version_by_alias("animal", "production").version == before.version


def test_the_catalogues_reader_cannot_write(team, people, tmp_path):
    import psycopg

    images, metadata = tmp_path / "images", tmp_path / "metadata.csv"
    extract("synthetic", images, metadata, images_per_class=2, seed=11)
    url = fresh_database(team, "roles")
    assert populate(metadata, images, url).inserted == 6  # the writer (this process's role)
    reader_url = team.database_url("roles", role=READER)
    reader_password = team.password(READER)
    assert people["reader"]["PGPASSWORD"] == reader_password and people["trainer"]["PGPASSWORD"] == team.password(WRITER)

    # populate with the reader's role: one line that names the role (the admin's login, so MLflow lets it start).
    env = team_env(team, ANIMAL_DB=reader_url, PGPASSWORD=reader_password)
    command = [sys.executable, "-m", "steps.populate", "--metadata", str(metadata), "--image-store", str(images), "--db", reader_url]
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"populate: error: permission denied: PostgreSQL role {READER} may not write the catalogue postgresql://{READER}@")
    )

    as_reader = f"{reader_url.replace('@', f':{reader_password}@', 1)}"
    with psycopg.connect(as_reader, autocommit=True) as conn:
        assert conn.execute("SELECT count(*) FROM images").fetchone()[0] == 6
        for statement in (
            "DELETE FROM images",
            "UPDATE images SET label = 'x'",
            "INSERT INTO settings VALUES ('k', 'v')",
            "DROP TABLE images",
        ):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute(statement)
    # Each role reaches only its own databases.
    for role, database in ((READER, "mlflow"), (WRITER, "mlflow_auth"), ("mlflow_server", "animal")):
        with pytest.raises(psycopg.OperationalError, match="permission denied for database"):
            psycopg.connect(team.database_url(database, role=role, password=True)).close()


def test_no_password_in_ps_logs_runs_or_open_files(team_pipeline, team, people):
    secrets = {
        **{f"postgres {role}": team.password(role) for role in (USER, WRITER, READER, "mlflow_server")},
        **{f"login {user}": team.user_password(user) for user in (ADMIN, "reader-1", "trainer-1", "releaser-1")},
        "flask secret": team.secret_key_file.read_text().strip(),
    }
    processes = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=True).stdout
    assert "mlflow server" in processes and "--app-name basic-auth" in processes
    logs = [team.tracking_log, team.postgres_dir / "postgres.log"]
    client = team_pipeline["client"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=1000)
    logged = json.dumps([r.data.params for r in runs] + [r.data.tags for r in runs])
    for what, secret in secrets.items():
        assert secret not in processes, what
        assert all(secret not in log.read_text(errors="replace") for log in logs), what
        assert secret not in logged, what
    # Every file that holds one is 0600 (the team folder, and the pipeline's working folder).
    for folder in (team.home, team_pipeline["work"]):
        for path in folder.rglob("*"):
            if path.is_file() and path.stat().st_size < 10**7 and any(s.encode() in path.read_bytes() for s in secrets.values()):
                assert path.stat().st_mode & 0o777 == 0o600, path
    assert (team.users_dir.stat().st_mode & 0o077) == 0


def test_a_cluster_from_before_the_roles_is_handed_over(team):
    """What the superuser owned in a database (a cluster made before the per-job roles) goes to the
    database's owner at the next `team up`: here one table, its serial's sequence and an enum type."""
    import psycopg

    from team.cluster import _hand_over

    with psycopg.connect(team.database_url("postgres", password=True), autocommit=True) as conn:
        conn.execute("DROP DATABASE IF EXISTS legacy")
        conn.execute("CREATE DATABASE legacy")
    with psycopg.connect(team.database_url("legacy", password=True), autocommit=True) as conn:
        conn.execute("CREATE TYPE kind AS ENUM ('a', 'b')")
        conn.execute("CREATE TABLE things (id serial PRIMARY KEY, k kind)")
        conn.execute("CREATE VIEW some_things AS SELECT id FROM things")
    _hand_over(team, "legacy", WRITER)
    with psycopg.connect(team.database_url("legacy", password=True), autocommit=True) as conn:
        owners = conn.execute(
            "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'public' AND c.relkind IN ('r', 'S', 'v')"
        ).fetchall()
        kind_owner = conn.execute("SELECT pg_get_userbyid(typowner) FROM pg_type WHERE typname = 'kind'").fetchone()[0]
    assert dict(owners) == {"things": WRITER, "things_id_seq": WRITER, "some_things": WRITER} and kind_owner == WRITER


def test_team_user_list_remove_and_env(team, people):
    """The runbook's commands: `team user list`, `team env --user NAME --role reader`, `team user remove`."""
    listed = team_cli(team, "user", "list").stdout.splitlines()
    assert {"admin\tadmin", "reader-1\treader", "trainer-1\ttrainer", "releaser-1\treleaser"} <= set(listed)
    shown = team_cli(team, "env", "--user", "reader-1", "--role", "reader").stdout
    assert shown == "".join(f"export {name}={value}\n" for name, value in people["reader"].items())
    team_cli(team, "user", "add", "leaver", "--role", "trainer")
    login = ("leaver", team.user_password("leaver"))
    search = f"{team.tracking_uri()}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(search, auth=login, timeout=30).status_code == 200
    team_cli(team, "user", "remove", "leaver")
    assert requests.get(search, auth=login, timeout=30).status_code == 401
    assert not (team.users_dir / "leaver.env").exists() and "leaver\ttrainer" not in team_cli(team, "user", "list").stdout
