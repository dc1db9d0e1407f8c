"""A Spark standalone cluster on this machine, from PySpark's own distribution: one master and N
workers, for `score --engine spark --spark-master spark://...` (docs/scoring.md).

    python -m steps.spark_cluster up [--workers 2 --cores 1 --memory 2g]   # make spark-up
    python -m steps.spark_cluster status
    python -m steps.spark_cluster down                                     # make spark-down

The tests start and stop their cluster with the same functions (tests/test_score_spark.py). What
was started is recorded in `<state>/cluster.json` (default `.spark/`, git-ignored): the master's
URL, its web UI, and each process's id, so `down` stops exactly those processes, and only if they
are still Spark's. Each daemon runs in its own process group, which its executors and their
Python workers inherit: stopping (or killing, in the failure test) a worker stops its whole tree.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from web.serve import free_port

STATE = Path(".spark")
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"


class ClusterError(RuntimeError):
    """The cluster cannot be started or stopped; the message says why in one line."""


@dataclass(frozen=True)
class Cluster:
    master: str  # spark://host:port, what `--spark-master` takes
    web_ui: str  # the master's web UI; /json/ lists the workers
    pids: dict[str, int]  # "master", "worker-0", ... -> process id (= its process group)
    state: str  # the folder holding cluster.json, the logs and the workers' work folders

    def worker_pids(self) -> list[int]:
        return [pid for name, pid in sorted(self.pids.items()) if name.startswith("worker-")]


def spark_class() -> Path:
    """PySpark's `bin/spark-class`: the pip package is a whole Spark distribution."""
    try:
        import pyspark
    except ImportError:
        raise ClusterError("pyspark is not installed: `make install-test` installs it (requirements-test.txt)") from None
    script = Path(pyspark.__file__).parent / "bin" / "spark-class"
    if not script.is_file():
        raise ClusterError(f"{script} is missing: reinstall pyspark")
    return script


def _environment(host: str, state: Path) -> dict[str, str]:
    env = dict(os.environ)
    # Bind to the address asked for (not the machine's name), and let the Python workers that the
    # executors start be this environment's Python, not the first `python3` on PATH.
    env["SPARK_LOCAL_IP"] = host
    env.setdefault("PYSPARK_PYTHON", sys.executable)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["SPARK_LOG_DIR"] = str(state / "logs")
    return env


def _launch(name: str, arguments: list[str], env: dict[str, str], state: Path) -> int:
    log = (state / "logs" / f"{name}.log").open("ab")
    try:
        # Its own session: our Ctrl-C does not reach it, and its process group is its whole tree.
        command = [str(spark_class()), *arguments]
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    finally:
        log.close()
    return process.pid


def start(
    state: Path = STATE, workers: int = 2, cores: int = 1, memory: str = "2g", host: str = "127.0.0.1", timeout: float = 180
) -> Cluster:
    """Start a master and `workers` workers on free ports of `host`; returns once every worker has
    registered with the master. Raises ClusterError (and stops what it started) otherwise."""
    state = Path(state).absolute()
    if (state / "cluster.json").exists():
        running = read(state)
        if running is not None and _alive(running):
            raise ClusterError(f"a cluster is already running at {running.master} (state in {state}): stop it first")
        stop(state)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    env = _environment(host, state)
    port, ui = free_port(host), free_port(host)
    pids = {"master": _launch("master", [MASTER_CLASS, "--host", host, "--port", str(port), "--webui-port", str(ui)], env, state)}
    cluster = Cluster(f"spark://{host}:{port}", f"http://{host}:{ui}", pids, str(state))
    _write(cluster)  # now, so that `down` can stop a half-started cluster
    try:
        _wait_for_master(cluster, timeout)
        for index in range(workers):
            pids[f"worker-{index}"] = start_worker(cluster, index, cores, memory, host, env)
            _write(cluster)
        _wait_for_workers(cluster, workers, timeout)
    except BaseException:
        stop(state)
        raise
    return cluster


def start_worker(cluster: Cluster, index: int, cores: int, memory: str, host: str, env: dict[str, str] | None = None) -> int:
    """One more worker for `cluster` (its pid); the caller records it."""
    state = Path(cluster.state)
    work = state / "work" / f"worker-{index}"
    work.mkdir(parents=True, exist_ok=True)
    arguments = [WORKER_CLASS, cluster.master, "--host", host, "--port", str(free_port(host))]
    arguments += ["--webui-port", str(free_port(host)), "--cores", str(cores), "--memory", memory, "--work-dir", str(work)]
    return _launch(f"worker-{index}", arguments, env or _environment(host, state), state)


def alive_workers(cluster: Cluster) -> int:
    """How many workers the master counts as ALIVE (0 when it does not answer)."""
    try:
        answer = requests.get(f"{cluster.web_ui}/json/", timeout=5).json()
    except (requests.RequestException, ValueError):
        return 0
    return sum(1 for worker in answer.get("workers", []) if worker.get("state") == "ALIVE")


def _wait_for_master(cluster: Cluster, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(cluster.pids["master"]):
            raise ClusterError(f"the Spark master exited at start: see {Path(cluster.state) / 'logs' / 'master.log'}")
        try:
            requests.get(f"{cluster.web_ui}/json/", timeout=5).raise_for_status()
            return
        except requests.RequestException:
            time.sleep(0.5)
    raise ClusterError(f"the Spark master did not answer at {cluster.web_ui} within {timeout:.0f} s")


def _wait_for_workers(cluster: Cluster, workers: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while alive_workers(cluster) < workers:
        for name in cluster.pids:
            if not _running(cluster.pids[name]):
                raise ClusterError(f"Spark's {name} exited at start: see {Path(cluster.state) / 'logs' / (name + '.log')}")
        if time.monotonic() > deadline:
            raise ClusterError(f"{alive_workers(cluster)} of {workers} Spark workers registered within {timeout:.0f} s")
        time.sleep(0.5)


def read(state: Path = STATE) -> Cluster | None:
    """The cluster recorded in `state`, or None."""
    try:
        return Cluster(**json.loads((Path(state) / "cluster.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write(cluster: Cluster) -> None:
    target = Path(cluster.state) / "cluster.json"
    temporary = target.with_suffix(".tmp")
    temporary.write_text(json.dumps(asdict(cluster), indent=1))
    os.replace(temporary, target)


def _running(pid: int) -> bool:
    """The process exists, is not a zombie, and is one of Spark's daemons (not a reused pid)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    # Field 3 of /proc/pid/stat, after the parenthesised name, is the state; Z is a zombie.
    return status.rsplit(")", 1)[1].split()[0] != "Z" and b"org.apache.spark.deploy" in command


def _alive(cluster: Cluster) -> bool:
    return any(_running(pid) for pid in cluster.pids.values())


def kill(pid: int, sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal a daemon's whole process group (its executors and their Python workers too)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, sig)


def stop(state: Path = STATE, timeout: float = 20) -> list[str]:
    """Stop the cluster recorded in `state` (workers first): SIGTERM, then SIGKILL for what is left
    after `timeout`. Returns the names of the processes that were running."""
    cluster = read(state)
    if cluster is None:
        return []
    names = sorted(cluster.pids, key=lambda name: name == "master")  # workers before the master
    stopped = [name for name in names if _running(cluster.pids[name])]
    for name in stopped:
        kill(cluster.pids[name], signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while any(_running(cluster.pids[name]) for name in stopped) and time.monotonic() < deadline:
        time.sleep(0.2)
    for name in names:
        # Also the group of a daemon already gone: an executor it left behind is still in it.
        kill(cluster.pids[name], signal.SIGKILL)
    for name in names:
        _reap(cluster.pids[name])
    (Path(state) / "cluster.json").unlink(missing_ok=True)
    return stopped


def _reap(pid: int) -> None:
    """Collect the exit status when this process started the daemon (the tests), so no zombie stays."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("up", "down", "status"))
    parser.add_argument("--state", type=Path, default=STATE, help="where the pids, ports and logs are kept (default .spark/)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cores", type=int, default=1, help="cores per worker")
    parser.add_argument("--memory", default="2g", help="memory per worker, for its executors")
    parser.add_argument("--host", default="127.0.0.1", help="the address to bind (0.0.0.0 or this host's name for other machines)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            cluster = start(args.state, args.workers, args.cores, args.memory, args.host)
            each = f"{args.cores} cores, {args.memory} each"
            print(f"spark: master {cluster.master} with {args.workers} workers ({each}); web UI {cluster.web_ui}")
            print(f"  python -m steps.score --engine spark --spark-master {cluster.master} --input ... --output ...")
            print(f"  stop it with `make spark-down` (state in {args.state}/)")
        elif args.command == "down":
            stopped = stop(args.state)
            print(f"spark: stopped {', '.join(stopped)}" if stopped else f"spark: nothing running (state in {args.state}/)")
        else:
            cluster = read(args.state)
            if cluster is None or not _alive(cluster):
                print(f"spark: not running (state in {args.state}/)")
                return 1
            print(f"spark: master {cluster.master}, {alive_workers(cluster)} workers alive; web UI {cluster.web_ui}")
    except ClusterError as error:
        print(f"spark: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
