"""One-line errors when a shared service is down, instead of minutes of retries and a stack trace.

Each step's `main` is wrapped in `one_line_errors(step)`: before the step starts, a tracking server
given as MLFLOW_TRACKING_URI=http(s)://... must answer its /health (MLflow itself would retry for
minutes); while it runs, an unreachable catalogue database, image store or tracking server ends it
with one line that names what is unreachable and how to start it. A tracking server that refuses the
step's user (401: no or a wrong login; 403: a permission it lacks) ends it with one line as well:
"permission denied: <user> may not <what> (needs <PERMISSION> on <resource>)".
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

    if not isinstance(error, MlflowException) or error.get_http_status_code() not in (401, 403):
        return None
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if error.get_http_status_code() == 401 or not user:
        return (
            f"the MLflow tracking server {tracking_uri()} did not accept the login of "
            f"{user or 'an anonymous client'}: set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD "
            "(`source` the env file `python -m team user add` wrote for you)"
        )
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
            from databases.catalogue import CatalogueError
            from databases.image_store import StoreError

            problem = tracking_server_problem()
            if problem is None:
                try:
                    return main(argv)
                except (CatalogueError, StoreError) as error:
                    problem = str(error)
                except Exception as error:
                    # Refused by the tracking server, or it went away during the step: say that, not
                    # MLflow's retry trace.
                    problem = permission_problem(error) or tracking_server_problem()
                    if problem is None:
                        raise
            print(f"{step}: error: {problem}", file=sys.stderr)
            return 2

        return wrapped

    return wrap
