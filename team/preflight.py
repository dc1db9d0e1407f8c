"""One-line errors when a shared service is down, instead of minutes of retries and a stack trace.

Each step's `main` is wrapped in `one_line_errors(step)`: before the step starts, a tracking server
given as MLFLOW_TRACKING_URI=http(s)://... must answer its /health (MLflow itself would retry for
minutes); while it runs, an unreachable catalogue database, image store or tracking server ends it
with one line that names what is unreachable and how to start it. A tracking server that refuses the
step's user (401: no or a wrong login; 403: a permission it lacks) ends it with one line as well:
"permission denied: <user> may not <what> (needs <PERMISSION> on <resource>)".

It is also the one place that bounds MLflow's HTTP retries for the project's processes: MLflow's
defaults (7 retries, backoff factor 2, 120 s per request) kept a step whose tracking server died
silent for 8.4 minutes (issue 19). A variable the user set is left as it is.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import urllib.request
from collections.abc import Callable
from urllib.error import URLError

HEALTH_TIMEOUT = 5  # seconds: a server on the network answers /health well within this
# 3 retries with backoff factor 1 give a dead server about 10 s; a request may take 60 s (a model's
# artifacts through the server's proxy, on a slow link).
HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}


def bound_http_retries() -> None:
    """MLflow reads these at each request, and child processes (main's steps) inherit them."""
    for name, value in HTTP_DEFAULTS.items():
        os.environ.setdefault(name, value)


def tracking_uri() -> str:
    import mlflow

    return os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()


def tracking_server_problem(uri: str | None = None) -> str | None:
    """None if the tracking store is local or the server answers; else the one-line reason."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=HEALTH_TIMEOUT) as response:
            if response.status == 200:
                return None
            reason = f"HTTP {response.status}"
    except URLError as error:
        reason = str(getattr(error, "reason", error))
    except OSError as error:
        reason = str(error)
    return (
        f"the MLflow tracking server {uri} is unreachable ({reason}): start it (`make team-up` on its "
        "machine) or point MLFLOW_TRACKING_URI at a running one"
    )


# The REST path's tail -> what a step was doing, the permission it needs and on what (MLflow 3.17.2's
# validators, mlflow/server/auth/__init__.py; MANAGE for production: team/tracking_auth.py).
_WRITES = [
    (r"/experiments/create$", "create", "the admin's rights", "experiment"),
    (r"/registered-models/create$", "create", "the admin's rights", "model"),
    (r"/registered-models/(alias|rename)$|/model-versions/transition-stage$", "move production of", "MANAGE", "model"),
    (r"/model-versions/delete$|/registered-models/delete$", "delete from", "MANAGE", "model"),
    (r"/model-versions/|/registered-models/", "register or tag a version of", "EDIT", "model"),
    (r"/runs/|/logged-models|/mlflow-artifacts/", "log a run in", "EDIT", "experiment"),
    (r"/experiments/", "change", "EDIT", "experiment"),
]
_REFUSED = re.compile(r"endpoint (\S+) failed with error code (401|403)")


def permission_problem(error: BaseException) -> str | None:
    """The one line for a request the tracking server refused (401 or 403), else None."""
    from mlflow.exceptions import MlflowException

    if (artifacts := _artifacts_refused(error)) is not None:
        return artifacts
    if not isinstance(error, MlflowException) or error.get_http_status_code() not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if error.get_http_status_code() == 401 or not user:
        return _login_refused(user)
    endpoint, method, body = _refused_request(error)
    reading = ("read", "READ", "model" if "model" in endpoint else "experiment")
    writing = (rule[1:] for rule in _WRITES if re.search(rule[0], endpoint))
    what, permission, kind = reading if method == "GET" else next(writing, reading)
    if kind == "model":
        resource = f"registered model {body.get('name') or 'animal'}"
    elif what == "create":
        resource = f"experiment {body.get('name') or os.environ.get('MLFLOW_EXPERIMENT_NAME') or 'animal-faces'}"
    else:
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or _experiment_name(body.get("experiment_id")) or "animal-faces"
        resource = f"experiment {experiment}"
    return f"permission denied: {user} may not {what} {resource} (needs {permission} on {resource})"


def _login_refused(user: str | None) -> str:
    return (
        f"the MLflow tracking server {tracking_uri()} did not accept the login of "
        f"{user or 'an anonymous client'}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
        "(`source` the env file `python -m team user add` wrote for you)"
    )


def _artifacts_refused(error: BaseException) -> str | None:
    """The one line for an artifact download or upload the server refused. MLflow's artifact proxy
    answers through `requests` (an HTTPError, not an MlflowException); its path starts with the
    experiment's id: `<experiment id>/<run id or models/...>/...`."""
    from urllib.parse import parse_qs, urlparse

    import requests

    response = getattr(error, "response", None)
    if not isinstance(error, requests.HTTPError) or response is None or response.status_code not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if response.status_code == 401 or not user:
        return _login_refused(user)
    url = urlparse(response.url or "")
    path = parse_qs(url.query).get("path", [url.path.partition("/mlflow-artifacts/artifacts/")[2]])[0]
    experiment_id = path.split("/", 1)[0]
    resource = f"experiment {_experiment_name(experiment_id) or 'animal-faces'}"
    reading = response.request is None or response.request.method in ("GET", "HEAD")
    what, permission = ("read the artifacts of", "READ") if reading else ("write artifacts to", "EDIT")
    return f"permission denied: {user} may not {what} {resource} (needs {permission} on {resource})"


def _experiment_name(experiment_id: str | None) -> str | None:
    """The experiment's name if this user may read it, else its id."""
    if not experiment_id:
        return None
    import mlflow

    try:
        return mlflow.MlflowClient().get_experiment(experiment_id).name
    except Exception:
        return str(experiment_id)


def _refused_request(error: BaseException) -> tuple[str, str, dict]:
    """The REST path and JSON body of the refused call: MLflow's message names the path only when the
    server's answer is not JSON, its `call_endpoint` frame (mlflow/utils/rest_utils.py) has both."""
    endpoint, method, body = "", "POST", {}
    match = _REFUSED.search(str(error))
    if match:
        endpoint = match.group(1)
    tb = error.__traceback__
    while tb is not None:
        names = tb.tb_frame.f_locals
        if tb.tb_frame.f_code.co_name == "call_endpoint" and "endpoint" in names:
            endpoint, method = str(names["endpoint"]), str(names.get("method", method))
            raw = names.get("json_body") or names.get("params") or {}
            try:
                body = json.loads(raw) if isinstance(raw, str) else dict(raw)
            except (ValueError, TypeError):
                body = {}
        tb = tb.tb_next
    return endpoint, method, body


def one_line_errors(step: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Wrap a step's main(argv) -> exit code."""

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: list[str] | None = None) -> int:
            from sqlalchemy.exc import SQLAlchemyError

            from databases.catalogue import CatalogueError
            from databases.image_store import StoreError

            bound_http_retries()
            problem = tracking_server_problem()
            if problem is None:
                try:
                    return main(argv)
                except (CatalogueError, StoreError) as error:
                    problem = str(error)
                except SQLAlchemyError as error:
                    problem = database_lost(error)
                    if problem is None:
                        raise
                except Exception as error:
                    # Refused by the tracking server, or it went away during the step: say that, not
                    # MLflow's retry trace.
                    problem = permission_problem(error)
                    if problem is None:
                        problem = tracking_server_problem()
                        if problem is None:
                            raise
                        problem += left_running()
            print(f"{step}: error: {problem}", file=sys.stderr)
            return 2

        return wrapped

    return wrap


def database_lost(error: Exception) -> str | None:
    """The line for a catalogue database that went away during the step (None: another error)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    if not (isinstance(error, (OperationalError, InterfaceError)) or (isinstance(error, DBAPIError) and error.connection_invalidated)):
        return None
    lines = str(getattr(error, "orig", None) or error).strip().splitlines()
    reason = lines[0].rstrip(".") if lines else type(error).__name__
    # Every write of a step is one transaction (populate's too): the server rolled it back.
    return (
        f"the catalogue database stopped answering ({reason}); what this step had not committed was rolled back: "
        "start it (`make team-up` on its machine) and run the step again"
    )


def left_running() -> str:
    """What the line adds about the step's run, which could not be ended with the server gone."""
    from steps.tracking import started_run_id

    run_id = started_run_id() or os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return ""
    return (
        f"; its run {run_id} is left RUNNING: once the server is back, end it with "
        f"python -c \"import mlflow; mlflow.MlflowClient().set_terminated('{run_id}', 'FAILED')\""
    )
