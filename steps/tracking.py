"""Where a step's run goes and what it is called (docs/design.md, "Tracking").

Inside `mlflow run`, the step's run already exists (MLFLOW_RUN_ID): it is resumed and named after
the step. Run directly (`python -m steps.train`), a step logs to the project's experiment,
`animal-faces`, unless MLFLOW_EXPERIMENT_NAME or MLFLOW_EXPERIMENT_ID says otherwise.
"""

from __future__ import annotations

import os

from steps.defaults import EXPERIMENT


def start_run(name: str):
    """The step's run (an mlflow.ActiveRun), named `name` rather than a generated name, so that the
    run list says what ran. MLflow is imported here: extract and populate need it only for this."""
    import mlflow

    chosen = any(os.environ.get(key) for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"))
    if not chosen and mlflow.active_run() is None:
        mlflow.set_experiment(EXPERIMENT)
    run = mlflow.start_run(run_name=name)
    mlflow.set_tag("mlflow.runName", name)  # also when resuming the run `mlflow run` made
    login = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if login:
        # The author is the tracking server's login (team layout), not the OS user `mlflow run` records.
        mlflow.set_tag("mlflow.user", login)
    return run
