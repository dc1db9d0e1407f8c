"""The Spark engine of `score` (steps/score.py): the local engine's rows, scored on a cluster.

One pass over the data. The driver lists the input (paths only) into slices of `batch_size`
entries; each slice is one task that, on an executor, reads its files (through the project's
readers: local paths, .zip members, or s3:// objects via databases/image_store.py), hashes them,
scores each new content once with the pyfunc and returns the finished rows. So a file is read
once, its bytes never leave the executor that read it, and nothing is shuffled or joined.
Duplicates are found within a slice (where a shuffle would cost more than scoring the rare
duplicate that falls in another slice twice: the answer is the same either way).

The model is downloaded once by the driver, shipped to the executors as a Spark file, and loaded
once per Python worker process (MLflow's SparkModelCache, the cache `spark_udf` itself uses; Spark
reuses Python workers across tasks, spark.python.worker.reuse, on by default and set here).

Slices run as separate small jobs, a few more in flight than the cluster has cores, and their rows
come back in input order, so the driver writes parts as they come (a re-run resumes from them)
while every executor stays busy; toLocalIterator would run at most two slices at a time.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import zipfile
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path

from steps.score import READERS, Columns, Entry, InputError, Read, _batched, _read_ahead, predict

# The variables an executor needs to reach the object store the driver reads (databases/image_store.py):
# forwarded as spark.executorEnv.* so that executors on other hosts see the driver's settings.
# Spark redacts values whose names match spark.redaction.regex (secret, token...) in its UI and logs.
FORWARDED_ENV = (
    "AWS_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_PROFILE",
)
# Each task has one core (spark.task.cpus): a Python worker whose TensorFlow started a thread per
# core of the machine would fight the other tasks' workers for them. Unless set in the environment.
THREADS_PER_TASK = ("TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "OMP_NUM_THREADS")
PACKAGES = ("steps", "pyfunc", "databases", "team")  # what the executors import (steps.score imports team.preflight)
IN_FLIGHT_PER_CORE = 2  # slices queued per executor core: the next task is there when one ends


class SparkJobError(InputError):
    """The Spark job failed (e.g. every retry of a task); an InputError so that `score` says it in one line."""


def check() -> None:
    """InputError when PySpark or Java is missing."""
    import importlib.util

    if importlib.util.find_spec("pyspark") is None:
        raise InputError("the spark engine needs pyspark: `make install-test` installs it (requirements-test.txt)")
    home = os.environ.get("JAVA_HOME")
    if not shutil.which("java") and not (home and Path(home, "bin", "java").is_file()):
        raise InputError("the spark engine needs Java: `make java` installs Debian's openjdk-17-jre-headless")


def spark_session(master: str):
    """A SparkSession on `master`; under spark-submit, the master spark-submit was given."""
    from pyspark.sql import SparkSession

    # Our own progress line reports the job; Spark's console bar would write over it.
    builder = SparkSession.builder.appName("animal-faces score").config("spark.ui.showConsoleProgress", "false")
    builder = builder.config("spark.python.worker.reuse", "true")  # the default; the model cache depends on it
    for name in FORWARDED_ENV:
        if os.environ.get(name):
            builder = builder.config(f"spark.executorEnv.{name}", os.environ[name])
    for name in THREADS_PER_TASK:
        builder = builder.config(f"spark.executorEnv.{name}", os.environ.get(name, "1"))
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not launched by spark-submit: we choose the master
        builder = builder.master(master)
        if master.startswith(("spark://127.0.0.1:", "spark://localhost:")):
            # A loopback cluster (make spark-up, the tests) reaches the driver on loopback too, not at
            # whatever address this machine's name resolves to.
            builder = builder.config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
        # The executors' Python workers would start the first `python3` on PATH, not this environment's
        # (on other hosts, set PYSPARK_PYTHON to the executors' Python: docs/scoring.md).
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return builder.getOrCreate()


def score_spark(spark, model_uri: str, entries: list[Entry], columns: Columns, batch_size: int) -> Iterator[list[dict]]:
    """Rows for `entries`, one list per slice of `batch_size`, in order, scored on the executors."""
    context = spark.sparkContext
    archive = ship_model(spark, model_uri)
    _ship_code(spark)
    slices = max(1, -(-len(entries) // batch_size))
    # Plain tuples: the slices travel in the tasks, and Entry pickles by reference to steps.score.
    data = [(e.path, e.file, e.member) for e in entries]
    task = partial(score_slice, archive=archive, labels=columns.labels, optional=columns.optional, batch_size=batch_size)
    rdd = context.parallelize(data, slices).mapPartitions(task)
    # A thread per job in flight, which only waits on it: enough for executors that join later.
    jobs = ThreadPoolExecutor(max(64, 4 * context.defaultParallelism), thread_name_prefix="score-spark")
    in_flight: deque[Future] = deque()
    try:
        for index in range(slices):
            # Re-read every time: executors register after the session starts, and may come and go.
            while len(in_flight) >= IN_FLIGHT_PER_CORE * max(context.defaultParallelism, 1):
                yield _rows(in_flight.popleft())
            in_flight.append(jobs.submit(context.runJob, rdd, lambda rows: rows, [index]))
        while in_flight:
            yield _rows(in_flight.popleft())
    finally:
        if in_flight:  # stopped early (an error, Ctrl-C): do not leave the cluster busy
            context.cancelAllJobs()
        jobs.shutdown(wait=False, cancel_futures=True)


def _rows(job: Future) -> list[dict]:
    try:
        return job.result()
    except Exception as error:  # Py4JJavaError: the task failed spark.task.maxFailures times
        raise SparkJobError(f"the Spark job failed: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    """The first line that says why, out of a Java stack trace that may hold a Python one."""
    text = str(error)
    for line in text.splitlines():
        if "Error:" in line or "Exception:" in line:
            return line.strip()[:300]
    return text.splitlines()[0][:300] if text else type(error).__name__


def score_slice(rows: Iterable[tuple], archive: str, labels: tuple, optional: tuple, batch_size: int) -> Iterator[dict]:
    """On an executor: one slice's rows, read, hashed and scored in one pass."""
    from mlflow.pyfunc.spark_model_cache import SparkModelCache

    columns = Columns(labels, optional)
    if archive not in SparkModelCache._models:
        # One line in the executor's log per load: how the tests see that a worker loads it once.
        print(f"animal-faces: loading the model in Python worker {os.getpid()}", file=sys.stderr, flush=True)
    model, _ = SparkModelCache.get_or_load(archive)  # once per Python worker: Spark reuses them
    answers: dict[str, dict] = {}
    readers = ThreadPoolExecutor(READERS, thread_name_prefix="score-read")
    try:
        entries = (Entry(path, file, member) for path, file, member in rows)
        for batch in _batched(_read_ahead(readers, entries, 2 * batch_size), batch_size):
            new: dict[str, bytes] = {}
            for read in batch:
                if read.sha256 and read.sha256 not in answers:
                    new.setdefault(read.sha256, read.data)
            answers.update(zip(new, predict(model, list(new.values()), columns), strict=True))
            yield from (_row(read, answers, columns) for read in batch)
    finally:
        readers.shutdown(wait=False, cancel_futures=True)


def _row(read: Read, answers: dict[str, dict], columns: Columns) -> dict:
    answer = answers[read.sha256] if read.sha256 else columns.failed(read.error)
    return {"path": read.entry.path, "sha256": read.sha256, **answer}


_shipped: dict[tuple[str, str], str] = {}  # (Spark application, model URI) -> the archive its executors load


def ship_model(spark, model_uri: str) -> str:
    """Download the model once on the driver and add it to the session's files; the archive name
    the executors load it by. Cached per session, so a second job reuses the loaded models."""
    from mlflow.artifacts import download_artifacts
    from mlflow.pyfunc.spark_model_cache import SparkModelCache

    key = (spark.sparkContext.applicationId, model_uri)
    if key not in _shipped:
        folder = download_artifacts(artifact_uri=model_uri, dst_path=tempfile.mkdtemp(prefix="animal-faces-model-"))
        _shipped[key] = SparkModelCache.add_local_model(spark, folder)
    return _shipped[key]


_code_shipped: set[str] = set()  # Spark applications that have the code: Spark refuses a file name twice


def _ship_code(spark) -> None:
    """Send the project's packages to the executors (once per application): the readers and the model
    wrapper run there."""
    application = spark.sparkContext.applicationId
    if application in _code_shipped:
        return
    root = Path(__file__).resolve().parents[1]
    archive = Path(tempfile.mkdtemp(prefix="animal-faces-")) / "animal_faces_code.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for package in PACKAGES:
            for source in sorted((root / package).glob("*.py")):
                bundle.write(source, f"{package}/{source.name}")
    spark.sparkContext.addPyFile(str(archive))
    _code_shipped.add(application)
