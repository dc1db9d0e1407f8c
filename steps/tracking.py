"""Where a step's run goes and what it is called (docs/design.md, "Tracking").

Every entry point logs to the project's experiment, `animal-faces`, unless told otherwise
(MLFLOW_EXPERIMENT_NAME, or `--experiment-name` / `--experiment-id` given to `mlflow run`).
Run directly (`python -m steps.train`), a step chooses `animal-faces` itself. Inside `mlflow run`,
the step's run already exists (MLFLOW_RUN_ID): it is resumed and named after the step. But
`mlflow run` without an experiment makes that run in MLflow's Default experiment ("0"), before any
of our code runs, and MLproject cannot name one; so a step that finds its run there logs to a new
run in `animal-faces`, with the same parameters and tags. The run in Default stays, empty, tagged
with the one that replaced it: MLflow 3.17.2's `mlflow run` ends it itself after the step (always:
`_maybe_set_run_terminated` compares a status name with numbers), which fails on a deleted run, so
it cannot be deleted; `--experiment-name animal-faces` (as `make run` passes) avoids it. Default
itself is chosen by name only (MLFLOW_EXPERIMENT_NAME=Default): `--experiment-id 0` looks the
same as no choice to a step.
"""

from __future__ import annotations

import os
import sys

from steps.defaults import EXPERIMENT

DEFAULT_EXPERIMENT_ID = "0"  # MLflow's "Default", where `mlflow run` puts a run it was given no experiment for
MOVED_TAG = "animal_faces.moved_to"  # on a Default run that was moved: the run that replaced it


def start_run(name: str):
    """The step's run (an mlflow.ActiveRun), named `name` rather than a generated name, so that the
    run list says what ran. MLflow is imported here: extract and populate need it only for this."""
    import mlflow

    leave_default_experiment(name)
    chosen = any(os.environ.get(key) for key in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID"))
    if not chosen and mlflow.active_run() is None:
        mlflow.set_experiment(EXPERIMENT)
    run = mlflow.start_run(run_name=name)
    _started.append(run.info.run_id)
    mlflow.set_tag("mlflow.runName", name)  # also when resuming the run `mlflow run` made
    login = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if login:
        # The author is the tracking server's login (team layout), not the OS user `mlflow run` records.
        mlflow.set_tag("mlflow.user", login)
    return run


_started: list[str] = []  # the runs this process started, for the line that says one was left RUNNING


def started_run_id() -> str | None:
    """The last run this process started with start_run, if any."""
    return _started[-1] if _started else None


def leave_default_experiment(name: str) -> None:
    """Inside `mlflow run` that was given no experiment: replace the run it made in Default by one
    in `animal-faces` (MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_ID then name the new run and experiment,
    for this process and the runs it starts, e.g. main's steps)."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id or os.environ.get("MLFLOW_EXPERIMENT_NAME"):
        return
    import mlflow

    if mlflow.active_run() is not None:
        return
    client = mlflow.MlflowClient()
    made = client.get_run(run_id)
    if made.info.experiment_id != DEFAULT_EXPERIMENT_ID:
        return
    experiment = mlflow.set_experiment(EXPERIMENT)
    tags = {key: value for key, value in made.data.tags.items() if key != "mlflow.runName"}
    moved = client.create_run(experiment.experiment_id, tags=tags, run_name=made.info.run_name or name)
    params = [mlflow.entities.Param(key, value) for key, value in made.data.params.items()]
    if params:
        client.log_batch(moved.info.run_id, params=params)
    # `mlflow run` ends it with the step's outcome (FINISHED or FAILED).
    client.set_tag(run_id, MOVED_TAG, moved.info.run_id)
    client.set_tag(run_id, "mlflow.note.content", f"Logged to experiment {EXPERIMENT}, run {moved.info.run_id}.")
    os.environ["MLFLOW_RUN_ID"] = moved.info.run_id
    os.environ["MLFLOW_EXPERIMENT_ID"] = experiment.experiment_id
    print(
        f"{name}: logging to experiment '{EXPERIMENT}' as run {moved.info.run_id} (`mlflow run` made run {run_id} "
        "in Default; name another experiment with --experiment-name)",
        file=sys.stderr,
        flush=True,
    )


def followed(run_id: str) -> str:
    """The run that holds a step's results: `run_id`, or the run it was moved to (above)."""
    import mlflow

    return mlflow.MlflowClient().get_run(run_id).data.tags.get(MOVED_TAG, run_id)
