"""One-line errors when a shared service is down, instead of minutes of retries and a stack trace.

Each step's `main` is wrapped in `one_line_errors(step)`: before the step starts, a tracking server
given as MLFLOW_TRACKING_URI=http(s)://... must answer its /health (MLflow itself would retry for
minutes); while it runs, an unreachable catalogue database, image store or tracking server ends it
with one line that names what is unreachable and how to start it.
"""

from __future__ import annotations

import functools
import os
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
                except Exception:
                    # The tracking server went away during the step: say that, not MLflow's retry trace.
                    problem = tracking_server_problem()
                    if problem is None:
                        raise
            print(f"{step}: error: {problem}", file=sys.stderr)
            return 2

        return wrapped

    return wrap
