"""tune: a KerasTuner search over the `train` CNN, every trial a nested MLflow run, the best model
registered through the same gate as `train`'s.

The story, top to bottom:
1. the catalogue is read and decoded once for the whole search (train.load_data: one array of
   decoded images); every trial builds train.build_model from a keras_tuner HyperParameters mapped onto
   train.Hyperparameters (`hyperparameters`) and trains it with train.fit;
2. one MLflow parent run for the search; each trial runs inside a nested child run (`MlflowTrials`)
   with its hyperparameters, per-epoch metrics, final validation accuracy and status. A trial that
   raises is recorded as FAILED with its error and the search goes on (KerasTuner stops only after
   3 failures in a row);
3. the search's state is a folder, <directory>/<tuner>/: KerasTuner's oracle and trials, plus
   search.json with the parent run id and the settings. Running again resumes it: finished trials
   are not repeated, an interrupted one is run again, and the parent run is the same one;
4. at the end the parent run gets the best hyperparameters, trials.csv and trials.png; the best
   trial's model (its best epoch, no retraining) is logged by train.log_training, the same pyfunc
   `train` logs, and goes through register.register, the promotion gate;
5. distributed: with KERASTUNER_ORACLE_IP/PORT and KERASTUNER_TUNER_ID set, the `chief` serves the
   oracle and owns the parent run; each worker reads the parent run id (MLFLOW_PARENT_RUN_ID, else
   search.json in the shared directory) and logs its trials as children of that one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import keras
import keras_tuner as kt
import matplotlib.pyplot as plt
import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from databases import catalogue
from steps import backbones, defaults, tracking, train
from steps.register import ALIAS, MODEL_NAME, Promotion, register
from team.preflight import one_line_errors

TUNERS = {"random": kt.RandomSearch, "bayesian": kt.BayesianOptimization, "hyperband": kt.Hyperband}
OBJECTIVE = kt.Objective("val_accuracy", direction="max")
MAIN_HYPERPARAMETERS = ("conv_blocks", "filters", "dense_units", "dropout", "learning_rate", "augment")
STATE_FILE = "search.json"  # in the tuner's project folder, next to KerasTuner's oracle.json
PARENT_ENV = "MLFLOW_PARENT_RUN_ID"  # lets a worker join a search whose folder it cannot read
TRIAL_TAG = "trial_id"  # KerasTuner's id ("0", "1", ...): its folder is <directory>/<tuner>/trial_<id>
# Loading the best trial's weights into a fresh model skips the optimizer state, which we do not need.
warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")


class SearchMismatch(ValueError):
    """The search folder holds a search made with other settings."""


def hyperparameters(hp: kt.HyperParameters, network: train.Hyperparameters | None = None) -> train.Hyperparameters:
    """The search space, read as train.Hyperparameters; its defaults are `train`'s. The backbone,
    its weights and fine_tune_epochs are not searched: they come from `network` (the search's settings)."""
    default, network = train.Hyperparameters(), network or train.Hyperparameters()
    return train.Hyperparameters(
        # At 64 px two blocks see too little of the face; a fifth still has 4x4 pixels to look at.
        conv_blocks=hp.Int("conv_blocks", 3, 5, default=default.conv_blocks),
        # Cost grows with the square of the width: wider than 32 would not fit the time budget.
        filters=hp.Choice("filters", [16, 24, 32], default=default.filters),
        dense_units=hp.Choice("dense_units", [64, 128, 256], default=default.dense_units),
        # Choices rather than stepped floats: values log as 0.3, not 0.30000000000000004.
        dropout=hp.Choice("dropout", [0.0, 0.1, 0.2, 0.3, 0.4, 0.5], default=default.dropout),
        learning_rate=hp.Float("learning_rate", 3e-4, 1e-2, sampling="log", default=default.learning_rate),
        augment=hp.Choice("augment", [0.0, 0.05, 0.1, 0.15, 0.2], default=default.augment),
        batch_size=default.batch_size,
        backbone=network.backbone,
        weights=network.weights,
        fine_tune_epochs=network.fine_tune_epochs,
        head=network.head,
    )


class AnimalHyperModel(kt.HyperModel):
    """train.build_model and train.fit on data decoded once for all trials."""

    def __init__(self, data: train.Data, image_size: int, patience: int, seed: int, network: train.Hyperparameters | None = None):
        super().__init__(name="animal_cnn")
        self.data, self.image_size, self.patience, self.seed = data, image_size, patience, seed
        self.network = network or train.Hyperparameters()  # backbone, weights, fine_tune_epochs
        # patience 0: no early stopping, so that every trial's schedule runs to its end and trials
        # are compared at the same point of their learning-rate decay.

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        keras.utils.set_random_seed(self.seed)  # same initialisation for every trial: only the hps differ
        return train.build_model(hyperparameters(hp, self.network), self.image_size, len(self.data.labels), self.data.labels)

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        *args,
        epochs: int = 1,
        callbacks: list | None = None,
        initial_epoch: int = 0,
        **kwargs,
    ) -> keras.callbacks.History:
        # Hyperband passes `initial_epoch` when it continues an earlier trial's model.
        chosen, patience = hyperparameters(hp, self.network), self.patience or epochs
        # A pretrained backbone's head trains on its cached features (train.train_network).
        return train.train_network(model, self.data, chosen, epochs, patience, self.seed, callbacks=callbacks, initial_epoch=initial_epoch)


class MlflowTrials:
    """Mixed into a KerasTuner tuner: each trial runs inside a child run of the search's parent run,
    and a person sees "trial n of N", its result and the best so far after each trial."""

    search_run: mlflow.entities.RunInfo  # the parent run: set before `search`

    def run_trial(self, trial: kt.engine.trial.Trial, *args, **kwargs) -> list:
        tags = {TRIAL_TAG: trial.trial_id, "tuner_id": self.tuner_id}
        with mlflow.start_run(
            run_name=f"trial {number(trial.trial_id)}",
            experiment_id=self.search_run.experiment_id,
            parent_run_id=self.search_run.run_id,
            nested=True,
            tags=tags,
        ):
            mlflow.log_params(trial.hyperparameters.values)
            try:
                histories = super().run_trial(trial, *args, **kwargs)
            except KeyboardInterrupt:  # the trial runs again when the search is resumed
                mlflow.set_tag("trial_status", "KILLED")
                mlflow.end_run("KILLED")
                raise
            except Exception as error:
                message = f"{type(error).__name__}: {error}"
                mlflow.set_tags({"trial_status": "FAILED", "error": message[:4000]})
                mlflow.log_text(traceback.format_exc(), "error.txt")
                mlflow.end_run("FAILED")
                self._outcome[trial.trial_id] = f"FAILED, {message[:200]} (the search goes on)"
                if isinstance(error, kt.errors.FatalError):  # KerasTuner's "stop the search" errors
                    raise
                # FAILED, not retried: KerasTuner records it and the search goes on.
                raise kt.errors.FailedTrialError(message) from error
            score = max(max(h.history["val_accuracy"]) for h in histories)
            mlflow.log_metric("final_val_accuracy", score)
            mlflow.set_tag("trial_status", "COMPLETED")
        epochs = sum(len(h.history["val_accuracy"]) for h in histories)
        self._outcome[trial.trial_id] = f"val_accuracy {score:.4f} ({plural(epochs, 'epoch')}"
        return histories

    def on_search_begin(self) -> None:
        super().on_search_begin()
        self._outcome: dict[str, str] = {}
        self._search_started, self._trial_started, self._finished = time.monotonic(), 0.0, 0

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)
        self._trial_started = time.monotonic()
        print(f"\n[tune] {self._label(trial)}: {describe(trial.hyperparameters.values)}", flush=True)

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_end(trial)  # reports to the oracle, which stops the search after 3 failures in a row
        now, self._finished = time.monotonic(), self._finished + 1
        outcome = self._outcome.get(trial.trial_id, trial.status)
        if outcome.startswith("val_accuracy"):
            outcome += f", {duration(now - self._trial_started)})"
        best = self.oracle.get_best_trials(1)
        best = (
            f"best so far {best[0].score:.4f} (trial {number(best[0].trial_id)})"
            if best and best[0].score is not None
            else "no trial completed yet"
        )
        elapsed = now - self._search_started
        # A worker cannot ask the oracle what is left; a single process can.
        remaining = self.oracle.remaining_trials() if hasattr(self.oracle, "remaining_trials") else None
        eta = f", about {duration(elapsed / self._finished * remaining)} to go" if remaining else ""
        print(f"[tune] {self._label(trial)}: {outcome} | {best} | {duration(elapsed)} elapsed{eta}", flush=True)

    def _label(self, trial: kt.engine.trial.Trial) -> str:
        total = f" of {self.oracle.max_trials}" if self.oracle.max_trials else ""
        worker = f" on {self.tuner_id}" if role() == "worker" else ""
        return f"trial {number(trial.trial_id)}{total}{worker}"


def number(trial_id: str) -> int:
    """KerasTuner numbers trials from 0, in the order the oracle hands them out to all workers."""
    return int(trial_id) + 1


def describe(values: dict) -> str:
    """Hyperparameter values in the search space's order (a worker gets them back in another)."""
    names = [*MAIN_HYPERPARAMETERS, *sorted(set(values) - set(MAIN_HYPERPARAMETERS))]
    return " ".join(f"{k}={values[k]:.3g}" if isinstance(values[k], float) else f"{k}={values[k]}" for k in names if k in values)


def make_tuner(
    kind: str, hypermodel: AnimalHyperModel, max_trials: int, epochs: int, seed: int, directory: Path, overwrite: bool
) -> kt.Tuner:
    if kind not in TUNERS:
        raise ValueError(f"unknown tuner {kind!r}: choose one of {', '.join(TUNERS)}")
    base = TUNERS[kind]
    budget = {"max_epochs": epochs} if kind == "hyperband" else {"max_trials": max_trials}
    if kind == "bayesian":  # KerasTuner's default (3 x 6 random points) would leave no room for the model
        budget["num_initial_points"] = max(3, max_trials // 3)
    tuner = type(f"Mlflow{base.__name__}", (MlflowTrials, base), {})(
        hypermodel,
        objective=OBJECTIVE,
        seed=seed,
        directory=str(directory),
        project_name=kind,
        overwrite=overwrite,
        max_consecutive_failed_trials=3,
        **budget,
    )
    if kind == "hyperband":
        tuner.oracle.max_trials = max_trials  # Hyperband has no trial budget of its own: cap it
    return tuner


def role() -> str:
    """`single`, or in KerasTuner's distributed mode `chief` (serves the oracle) or `worker`."""
    if "KERASTUNER_ORACLE_IP" not in os.environ:
        return "single"
    return "chief" if "chief" in os.environ.get("KERASTUNER_TUNER_ID", "") else "worker"


@dataclass
class Result:
    run_id: str
    best_trial: str
    best_val_accuracy: float
    best: train.Hyperparameters
    trials: pd.DataFrame
    model_uri: str
    promotion: Promotion


def tune(
    db_path: Path,
    max_trials: int = defaults.MAX_TRIALS,
    epochs: int = defaults.TUNE_EPOCHS,
    tuner: str = defaults.TUNER,
    image_size: int = defaults.IMAGE_SIZE,
    seed: int = defaults.SEED,
    overwrite: bool = False,
    directory: Path = defaults.TUNING_DIR,
    patience: int = defaults.TUNE_PATIENCE,
    model_name: str = MODEL_NAME,
    network: train.Hyperparameters | None = None,
) -> Result | None:
    """Run (or resume) a search; returns its result, or None on a distributed worker. `network`:
    backbone, weights and fine_tune_epochs for every trial (the rest of it is searched)."""
    started, mode = time.monotonic(), role()
    network = network or train.Hyperparameters()
    backbones.check(network.backbone, network.weights, network.head)
    if network.backbone != backbones.CNN:  # a missing weights file stops us here, before any work
        backbones.weights_file(network.backbone, network.weights, network.head)
    # Inside `mlflow run`, the run it made for this command; the search's parent run may be another.
    tracking.leave_default_experiment("tune")  # as every step: animal-faces unless told otherwise
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)
    keras.utils.set_random_seed(seed)
    data = train.load_data(db_path, image_size)
    settings = {
        "tuner": tuner,
        "epochs": epochs,
        "patience": patience,
        "image_size": image_size,
        "seed": seed,
        "catalogue_sha256": data.content_hash,
        "backbone": network.backbone,
        "weights": network.weights,
        "fine_tune_epochs": network.fine_tune_epochs,
        # Only when not the default, so that a search begun before there was a head resumes.
        **({"head": network.head} if network.head != backbones.NEW_HEAD else {}),
    }
    hypermodel = AnimalHyperModel(data, image_size, patience, seed, network)
    if overwrite and mode == "worker":
        print("[tune] overwrite is the chief's to decide: this worker joins the search as it is")
    search = make_tuner(tuner, hypermodel, max_trials, epochs, seed, directory, overwrite=overwrite and mode != "worker")
    if mode == "worker":
        run_worker(search, settings, epochs, launcher)
        return None
    result = run_search(search, settings, data, db_path, max_trials, directory, launcher, model_name)
    print_summary(result, tuner, model_name, started)
    return result


def run_worker(search: kt.Tuner, settings: dict, epochs: int, launcher: str | None) -> None:
    """A distributed worker: trials from the chief's oracle, logged under the chief's parent run."""
    state_file = Path(search.project_dir) / STATE_FILE
    search.oracle.get_space()  # blocks until the chief serves the oracle (and wrote search.json)
    # MLFLOW_PARENT_RUN_ID lets a worker join without reading the chief's folder (no settings check then).
    given = os.environ.get(PARENT_ENV)
    state = read_state(state_file, settings) if state_file.exists() or not given else {}
    parent = MlflowClient().get_run(given or state["parent_run_id"])
    search.search_run = parent.info
    tag_session(launcher, parent.info.run_id, f"worker {search.tuner_id}", "worker")
    print(f"[tune] worker {search.tuner_id}: trials go to MLflow run {parent.info.run_id}", flush=True)
    search.search(epochs=epochs, callbacks=[train.MlflowMetrics()], verbose=0)
    print(f"[tune] worker {search.tuner_id}: the oracle has no more trials; the chief logs the result")


def run_search(
    search: kt.Tuner,
    settings: dict,
    data: train.Data,
    db_path: Path,
    max_trials: int,
    directory: Path,
    launcher: str | None,
    model_name: str,
) -> Result:
    """A single process, or the chief serving the oracle: owns the parent run, new or resumed."""
    state_file = Path(search.project_dir) / STATE_FILE
    state = read_state(state_file, settings) if state_file.exists() else {}
    parent_id = existing_run(state.get("parent_run_id"))
    if state and parent_id is None:
        print(
            f"[tune] warning: the search's MLflow run {state['parent_run_id']} is gone; its earlier "
            "trials stay in the search but not in MLflow"
        )
    done = sum(t.status in ("COMPLETED", "FAILED") for t in search.oracle.trials.values())
    print(
        f"[tune] {settings['tuner']} search of {plural(max_trials, 'trial')}, up to {plural(settings['epochs'], 'epoch')} "
        f"each, on {len(data.y_train)} train / {len(data.y_val)} validation images at {settings['image_size']} px; "
        f"state in {search.project_dir}" + (f" (resuming: {plural(done, 'trial')} done)" if done else ""),
        flush=True,
    )

    run_name = None if parent_id else f"tune-{settings['tuner']}"
    with mlflow.start_run(run_id=parent_id or launcher, run_name=run_name) as run:
        if parent_id is None:  # a new search
            log_search_settings(run, settings, data, db_path, max_trials, directory)
            train.log_catalogue(data, db_path)
        if launcher and launcher != run.info.run_id:
            tag_session(launcher, run.info.run_id, "resumed session", "session")
        write_state(state_file, run.info.run_id, settings)
        search.search_run = run.info
        try:
            if role() == "chief":
                if not finished(search):  # else no worker would come to tell the chief to stop
                    print(
                        f"[tune] chief: serving the oracle on {os.environ['KERASTUNER_ORACLE_IP']}:"
                        f"{os.environ['KERASTUNER_ORACLE_PORT']}; start the workers",
                        flush=True,
                    )
                    search.search(verbose=1)  # KerasTuner's display: the chief's view of every trial
            else:
                search.search(epochs=settings["epochs"], callbacks=[train.MlflowMetrics()], verbose=0)
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise
        return summarise(search, data, settings["image_size"], db_path, model_name)


def read_state(state_file: Path, settings: dict) -> dict:
    if not state_file.exists():
        raise FileNotFoundError(f"{state_file} is missing: start the chief first, with the same directory")
    state = json.loads(state_file.read_text())
    different = {k: (v, settings.get(k)) for k, v in state["settings"].items() if settings.get(k) != v}
    if different:
        said = ", ".join(f"{k}={was} (now {now})" for k, (was, now) in different.items())
        raise SearchMismatch(
            f"the search in {state_file.parent} was made with {said}: run with the same "
            "settings to resume it, or with overwrite=true (or another directory) to start over"
        )
    return state


def write_state(state_file: Path, parent_run_id: str, settings: dict) -> None:
    state_file.write_text(json.dumps({"parent_run_id": parent_run_id, "settings": settings}, indent=2))


def existing_run(run_id: str | None) -> str | None:
    """The run id if that run is still there (not deleted, same tracking store)."""
    if not run_id:
        return None
    try:
        return run_id if MlflowClient().get_run(run_id).info.lifecycle_stage == "active" else None
    except MlflowException:
        return None


def tag_session(launcher: str | None, parent_id: str, name: str, role: str) -> None:
    """The run `mlflow run` made for a worker or a resumed session holds nothing: file it under the
    search's run so that it does not pose as a search of its own."""
    if launcher and launcher != parent_id:
        client = MlflowClient()
        client.set_tag(launcher, MLFLOW_PARENT_RUN_ID, parent_id)
        client.set_tag(launcher, "tune.role", role)
        client.update_run(launcher, name=name)


def log_search_settings(run: mlflow.ActiveRun, settings: dict, data: train.Data, db_path: Path, max_trials: int, directory: Path) -> None:
    params = {
        **settings,
        "max_trials": max_trials,
        "db": catalogue.describe(db_path),
        "directory": str(directory),
        "labels": json.dumps(data.labels),
        "train_images": len(data.y_train),
        "val_images": len(data.y_val),
    }
    params.pop("catalogue_sha256")  # a tag, as in `train`
    # `mlflow run` has already logged the entry point's parameters, in its own spelling: keep those.
    logged = MlflowClient().get_run(run.info.run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
    mlflow.set_tag("tune.tuner", settings["tuner"])


def finished(search: kt.Tuner) -> bool:
    trials = search.oracle.trials.values()
    return search.oracle.remaining_trials() == 0 and all(t.status in ("COMPLETED", "FAILED") for t in trials)


def summarise(search: kt.Tuner, data: train.Data, image_size: int, db_path: Path, model_name: str) -> Result:
    """Into the parent run: the trials, the best hyperparameters, the best model through the gate."""
    run = mlflow.active_run()
    children = child_runs(run.info)
    table = trials_table(search.oracle, children)
    completed = table[table.status == "COMPLETED"]
    mlflow.log_metrics({"trials_completed": len(completed), "trials_failed": int((table.status == "FAILED").sum())})
    if completed.empty:
        raise RuntimeError("no trial completed: see the FAILED trial runs and their error.txt")
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    best_trial = search.oracle.get_best_trials(1)[0]
    logged = search.oracle.trials.get(tags.get("best_model_trial", ""))
    if logged is not None and logged.score == best_trial.score:
        best_trial = logged  # a tie with the trial whose model is logged already: keep that model
    best_values = best_trial.hyperparameters.values
    best = hyperparameters(best_trial.hyperparameters, search.hypermodel.network)
    mlflow.log_text(table.to_csv(index=False), "trials.csv")
    figure = trials_figure(table)
    mlflow.log_figure(figure, "trials.png")
    plt.close(figure)
    mlflow.log_dict(
        {
            "trial": number(best_trial.trial_id),
            "trial_id": best_trial.trial_id,
            "val_accuracy": best_trial.score,
            "hyperparameters": best_values,
        },
        "best_hyperparameters.json",
    )
    mlflow.log_metric("best_val_accuracy", best_trial.score)
    mlflow.set_tags({"best_trial": number(best_trial.trial_id), **{f"best.{k}": v for k, v in asdict(best).items()}})

    model_uri = tags.get(train.MODEL_TAG)
    if model_uri is None or tags.get("best_model_trial") != best_trial.trial_id:
        # The best trial's best epoch, as KerasTuner checkpointed it: no second training.
        model = search.load_model(best_trial)
        history = trial_history(children.get(best_trial.trial_id))
        _, model_uri = train.log_training(model, data, history, image_size, best)
        mlflow.set_tag("best_model_trial", best_trial.trial_id)
    promotion = register(model_uri, db_path, model_name)
    mlflow.log_metrics({"val_accuracy": promotion.accuracy, "promoted": float(promotion.promoted)})
    mlflow.set_tags({"model_version": promotion.version, "promotion": promotion.reason})
    return Result(run.info.run_id, best_trial.trial_id, best_trial.score, best, table, model_uri, promotion)


def child_runs(parent: mlflow.entities.RunInfo) -> dict[str, str]:
    """trial id -> its latest child run (an interrupted trial has a KILLED run and a later one)."""
    runs = mlflow.search_runs(
        [parent.experiment_id], filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent.run_id}'", order_by=["attributes.start_time ASC"]
    )
    if runs.empty or f"tags.{TRIAL_TAG}" not in runs:
        return {}
    runs = runs.dropna(subset=[f"tags.{TRIAL_TAG}"])
    return dict(zip(runs[f"tags.{TRIAL_TAG}"], runs.run_id))


def trials_table(oracle: kt.Oracle, children: dict[str, str]) -> pd.DataFrame:
    """One row per trial, from the oracle (it knows every worker's trials), with its MLflow run."""
    rows = [
        {
            "trial": number(t.trial_id),
            "trial_id": t.trial_id,
            "status": t.status,
            "val_accuracy": t.score,
            "best_epoch": None if t.best_step is None else int(t.best_step) + 1,
            **t.hyperparameters.values,
            "run_id": children.get(t.trial_id),
            "error": (t.message or "").strip().splitlines()[-1] if t.message else None,
        }
        for t in oracle.trials.values()
    ]
    return pd.DataFrame(rows).sort_values("trial", ignore_index=True)


def trials_figure(table: pd.DataFrame) -> plt.Figure:
    done = table[table.status == "COMPLETED"]
    best = done.loc[done.val_accuracy.idxmax()]
    figure, axes = plt.subplots(2, 3, figsize=(11, 6.5), sharey=True)
    for ax, name in zip(axes.flat, MAIN_HYPERPARAMETERS):
        ax.scatter(done[name], done.val_accuracy, alpha=0.7, label="trial")
        ax.scatter([best[name]], [best.val_accuracy], marker="*", s=220, color="crimson", label="best")
        ax.set(xlabel=name, xscale="log" if name == "learning_rate" else "linear")
        if name != "learning_rate":  # the values tried, not 4.2 blocks
            ax.set_xticks(sorted(done[name].unique()))
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation accuracy")
    axes[0, 0].legend()
    figure.suptitle(f"{len(done)} completed trials: best is trial {best.trial} at {best.val_accuracy:.4f}")
    figure.tight_layout()
    return figure


def trial_history(run_id: str | None) -> keras.callbacks.History | None:
    """The best trial's per-epoch metrics, read back from its run, for the parent's training curves."""
    if run_id is None:
        return None
    client, history = MlflowClient(), keras.callbacks.History()
    history.history = {
        key: [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]
        for key in ("loss", "accuracy", "val_loss", "val_accuracy")
    }
    return history


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def print_summary(result: Result, tuner: str, model_name: str, started: float) -> None:
    counts = result.trials.status.value_counts()
    print(f"""
=== tuning summary ===
search run        {result.run_id}  ({tuner}: {len(result.trials)} trials, {counts.get("COMPLETED", 0)} completed, \
{counts.get("FAILED", 0)} failed)
best trial        {number(result.best_trial)}: validation accuracy {result.best_val_accuracy:.4f}
best settings     {describe(asdict(result.best))}
model             {model_name} version {result.promotion.version}: \
{"promoted" if result.promotion.promoted else "not promoted"} ({result.promotion.reason})
took              {duration(time.monotonic() - started)}
more trials       mlflow run . -e tune --env-manager local -P tuner={tuner} -P max_trials={len(result.trials) + 10}
serve it          mlflow models serve -m models:/{model_name}@{ALIAS} -p 5001 --env-manager local""")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=catalogue.location, default=defaults.CATALOGUE)
    parser.add_argument("--max-trials", type=int, default=defaults.MAX_TRIALS)
    parser.add_argument("--epochs", type=int, default=defaults.TUNE_EPOCHS, help="per trial (Hyperband: the most per trial)")
    parser.add_argument("--tuner", choices=sorted(TUNERS), default=defaults.TUNER)
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    parser.add_argument("--patience", type=int, default=defaults.TUNE_PATIENCE, help="early stopping within a trial, in epochs; 0: off")
    parser.add_argument("--overwrite", type=defaults.boolean, default=False, help="true: start the search over; false (default): resume it")
    parser.add_argument("--directory", type=Path, default=defaults.TUNING_DIR)
    network = defaults.Hyperparameters()
    parser.add_argument("--backbone", choices=backbones.CHOICES, default=network.backbone)
    parser.add_argument("--weights", default=network.weights, help="imagenet, a weights file or none (backbones only)")
    parser.add_argument("--fine-tune-epochs", type=int, default=network.fine_tune_epochs)
    parser.add_argument("--head", choices=backbones.HEADS, default=network.head, help="mobilenet_v2: new or imagenet")
    return parser


@one_line_errors("tune")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        network = train.Hyperparameters(
            backbone=args.backbone, weights=args.weights, fine_tune_epochs=args.fine_tune_epochs, head=args.head
        )
        tune(
            args.db,
            args.max_trials,
            args.epochs,
            args.tuner,
            args.image_size,
            args.seed,
            args.overwrite,
            args.directory,
            args.patience,
            network=network,
        )
    except (FileNotFoundError, ValueError, LookupError, RuntimeError) as error:
        print(f"tune: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
