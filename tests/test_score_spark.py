"""The Spark engine of batch scoring gives the local engine's rows (Spark in local[2]).

Needs Java: `make install-test` installs Debian's openjdk-17-jre-headless, and pyspark from
requirements-test.txt, so in CI this runs; it skips (saying why) only where Java cannot be found."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from steps import score as scoring
from steps import score_spark, spark_cluster
from steps.defaults import SCORE_MODEL_URI
from tests.outputs import TOLERANCE
from tests.test_score import BAD, check_rows, collection, model  # noqa: F401 (fixtures)
from tests.test_team import s3  # noqa: F401 (the team tests' S3-protocol server: moto on loopback)


def java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home and (Path(home) / "bin" / "java").is_file():
        return str(Path(home) / "bin" / "java")
    return shutil.which("java")


pytestmark = [
    pytest.mark.skipif(
        java() is None, reason="Java not found (Spark needs it): `make install-test` installs Debian's openjdk-17-jre-headless"
    ),
]


@pytest.fixture(scope="module")
def spark():
    pytest.importorskip("pyspark", reason="pyspark is not installed: `make install-test` installs it")
    session = score_spark.spark_session("local[2]")
    yield session
    session.stop()


def test_spark_gives_the_local_engines_rows(collection, model, spark, tmp_path):  # noqa: F811
    folder, good = collection
    local = scoring.score(folder, tmp_path / "local.parquet", SCORE_MODEL_URI, batch_size=4, interactive=False)
    on_spark = scoring.score(
        folder, tmp_path / "spark.parquet", SCORE_MODEL_URI, engine="spark", spark_master="local[2]", batch_size=4, interactive=False
    )

    table = pq.read_table(tmp_path / "spark.parquet").to_pandas()
    check_rows(table, good, model)
    assert_same_rows(table, pq.read_table(tmp_path / "local.parquet").to_pandas())
    assert on_spark.summary.labels == local.summary.labels
    assert on_spark.summary.errors == local.summary.errors == len(BAD)
    assert on_spark.summary.error_kinds == local.summary.error_kinds


def assert_same_rows(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    """The same rows as the local engine's, in the same order."""
    assert list(table.columns) == list(expected.columns)
    assert table.path.tolist() == expected.path.tolist()
    # The model's numbers within float32 tolerance; what follows from them (label, flags, neighbours) is
    # checked against the pyfunc's own answer by check_rows, where a tie may fall either way.
    from_the_model = {"label", "uncertain", "unfamiliar", "similar_ids"}
    for name in table.columns:
        if pd.api.types.is_float_dtype(expected[name]):
            pd.testing.assert_series_equal(table[name], expected[name], atol=TOLERANCE, rtol=0)
        elif name not in from_the_model:
            assert [_plain(v) for v in table[name]] == [_plain(v) for v in expected[name]], name


def test_spark_reads_a_zip(collection, model, spark, tmp_path):  # noqa: F811
    import zipfile

    folder, good = collection
    archive = tmp_path / "photos.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for relative, data in good.items():
            bundle.writestr(relative, data)
    result = scoring.score(archive, tmp_path / "zip.csv", SCORE_MODEL_URI, engine="spark", spark_master="local[2]", interactive=False)
    check_rows(scoring._from_csv(tmp_path / "zip.csv"), good, model, {})
    assert result.summary.duplicates == 1


def _plain(value):
    return list(value) if hasattr(value, "__len__") and not isinstance(value, str) else value


# --- a standalone cluster on loopback: a master and two workers, as `make spark-up` starts them ------


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    """Spark's own master and two 1-core workers on free loopback ports (steps/spark_cluster.py),
    stopped at the end of the session whatever happened."""
    pytest.importorskip("pyspark", reason="pyspark is not installed: `make install-test` installs it")
    state = tmp_path_factory.mktemp("spark-cluster")
    try:
        yield spark_cluster.start(state, workers=2, cores=1, memory="2g")
    finally:
        spark_cluster.stop(state)


@pytest.fixture
def fresh_session():
    """No Spark session before or after: `score` then starts its own application on the master it is
    given (getOrCreate would hand it the local[2] session), with this environment (the S3 variables)."""
    from pyspark.sql import SparkSession

    def stop() -> None:
        # The process's session, also one a thread created (getActiveSession sees only this thread's).
        active = SparkSession._instantiatedSession or SparkSession.getActiveSession()
        if active is not None:
            active.stop()

    stop()
    yield
    stop()


def test_standalone_cluster_gives_the_local_engines_rows(collection, model, cluster, fresh_session, tmp_path):  # noqa: F811
    folder, good = collection
    local = scoring.score(folder, tmp_path / "local.parquet", SCORE_MODEL_URI, batch_size=4, interactive=False)
    assert spark_cluster.alive_workers(cluster) == 2
    code = scoring.main(
        ["--input", str(folder), "--output", str(tmp_path / "cluster.parquet"), "--engine", "spark"]
        + ["--spark-master", cluster.master, "--batch-size", "4"]
    )
    assert code == 0
    table = pq.read_table(tmp_path / "cluster.parquet").to_pandas()
    check_rows(table, good, model)
    assert_same_rows(table, local.table)
    assert _executors_that_ran_tasks(cluster) == 2  # the work was spread over both workers
    # 5 slices of 4 files on 2 one-core executors: each executor's Python worker loaded the model once
    # and kept it for its next tasks (spark.python.worker.reuse, MLflow's SparkModelCache).
    assert _lines_in_executor_logs(cluster, "animal-faces: loading the model") == 2


def _executor_logs(cluster: spark_cluster.Cluster) -> list[str]:
    """The stderr of each executor of the running application, from the workers' work folders."""
    from pyspark.sql import SparkSession

    application = SparkSession.getActiveSession().sparkContext.applicationId
    return [log.read_text(errors="replace") for log in (Path(cluster.state) / "work").glob(f"worker-*/{application}/*/stderr")]


def _executors_that_ran_tasks(cluster: spark_cluster.Cluster) -> int:
    return sum(1 for log in _executor_logs(cluster) if "Finished task" in log)


def _lines_in_executor_logs(cluster: spark_cluster.Cluster, text: str) -> int:
    return sum(line.count(text) for log in _executor_logs(cluster) for line in log.splitlines())


def test_standalone_cluster_reads_the_teams_bucket(collection, model, cluster, fresh_session, s3, tmp_path):  # noqa: F811
    """s3://bucket/prefix and a list of s3:// keys: the executors read the objects through the image
    store. The workers were started before the S3 variables were set: the executors have them from
    the driver (spark.executorEnv.*)."""
    folder, good = collection
    for relative, data in good.items():
        s3.put_object(Bucket="images", Key=f"incoming/{relative}", Body=data)
    s3.put_object(Bucket="images", Key="incoming/bad/not_an_image.jpg", Body=b"a text file with a .jpg name")
    s3.put_object(Bucket="images", Key="incoming/notes.txt", Body=b"not an image, not a row")
    s3.put_object(Bucket="images", Key="incoming/.hidden.jpg", Body=good["top.jpg"])
    bad = {"bad/not_an_image.jpg": "not an image"}

    local = scoring.score("s3://images/incoming", tmp_path / "local.parquet", SCORE_MODEL_URI, batch_size=4, interactive=False)
    check_rows(local.table, good, model, bad)
    on_cluster = scoring.score(
        "s3://images/incoming/", tmp_path / "cluster.parquet", engine="spark", spark_master=cluster.master, batch_size=4, interactive=False
    )
    assert_same_rows(pq.read_table(tmp_path / "cluster.parquet").to_pandas(), pq.read_table(tmp_path / "local.parquet").to_pandas())
    assert on_cluster.summary.ignored == local.summary.ignored == {".txt": 1}
    assert on_cluster.summary.duplicates == 1

    listing = tmp_path / "keys.txt"
    listing.write_text("s3://images/incoming/top.jpg\ns3://images/incoming/gone.jpg\n")
    listed = scoring.score(listing, tmp_path / "listed.csv", engine="spark", spark_master=cluster.master, interactive=False)
    rows = listed.table.set_index("path")
    assert rows.loc["s3://images/incoming/top.jpg"].sha256 == hashlib.sha256(good["top.jpg"]).hexdigest()
    assert rows.loc["s3://images/incoming/top.jpg"].error is None
    assert rows.loc["s3://images/incoming/gone.jpg"].error == "cannot read: no such object in the store"


@pytest.fixture
def many_images(pipeline, tmp_path_factory) -> Path:
    """600 distinct small photos: enough that a job of 150 4-file slices is still running when a worker is killed."""
    from steps.extract import extract

    root = tmp_path_factory.mktemp("many")
    extract("synthetic", root / "images", root / "metadata.csv", images_per_class=200, seed=11, synthetic_size=64)
    return root / "images"


def test_a_worker_killed_mid_job(model, many_images, fresh_session, tmp_path_factory, tmp_path):  # noqa: F811
    """Kill one worker's whole process tree (its executor and Python workers) once the first rows
    are written: the job finishes on the other worker (Spark runs the lost tasks again) or stops
    with one line and the same command resumes; the output is complete or absent, never partial."""
    state = tmp_path_factory.mktemp("spark-cluster-to-break")
    own = spark_cluster.start(state, workers=2, cores=1, memory="2g")  # its own: the session's cluster stays whole
    output = tmp_path / "scored.parquet"
    outcome: dict[str, object] = {}

    def job() -> None:
        try:
            outcome["result"] = scoring.score(many_images, output, engine="spark", spark_master=own.master, batch_size=4, interactive=False)
        except scoring.InputError as error:
            outcome["error"] = error

    try:
        worker = threading.Thread(target=job)
        worker.start()
        partial = output.with_name(output.name + ".partial")
        while worker.is_alive() and not list(partial.glob("part-*.parquet")):
            time.sleep(0.2)
        assert not output.exists(), "the job ended before the worker could be killed: make the input bigger"
        victim = own.pids["worker-0"]
        spark_cluster.kill(victim, signal.SIGKILL)
        worker.join()
        assert not spark_cluster._running(victim)
        if "error" in outcome:  # stopped: one line, nothing under the output's name, a re-run resumes
            message = str(outcome["error"])
            assert "\n" not in message and message.startswith("the Spark job failed"), message
            assert not output.exists() and list(partial.glob("part-*.parquet"))
            scoring.score(many_images, output, engine="spark", spark_master=own.master, batch_size=4, interactive=False)
    finally:
        spark_cluster.stop(state)
    table = pq.read_table(output).to_pandas()
    expected = scoring.score(many_images, tmp_path / "local.parquet", SCORE_MODEL_URI, batch_size=8, interactive=False).table
    assert len(table) == 600 and table.error.isna().all()
    assert_same_rows(table, expected)


def test_a_job_that_fails_on_every_try_stops_with_one_line(fresh_session, tmp_path, monkeypatch, capsys, pipeline):
    """An object store the executors cannot reach fails every try of a task: `score` says so in one
    line (exit code 2) and writes no output."""
    from web.serve import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    listing = tmp_path / "keys.txt"
    listing.write_text("s3://images/a.jpg\ns3://images/b.jpg\n")
    output = tmp_path / "out.parquet"
    code = scoring.main(["--input", str(listing), "--output", str(output), "--engine", "spark", "--spark-master", "local[2]"])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("score: error: the Spark job failed: ") and "is unreachable at http://127.0.0.1" in error, error
    assert not output.exists()
