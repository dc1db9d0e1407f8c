"""register: a logged model -> registered model `animal`, promoted through the gate.

The gate scores the new version and the current Production version on the catalogue's current
validation split, each with `mlflow.models.evaluate` (classifier: per-class precision and recall,
confusion matrix; our ROC and calibration plots beside them) in a run of its own. The new one
becomes Production (stage, archiving the old) and gets the alias `production` only if it is at least
as good: MLflow's validation with the Production accuracy as the threshold. Otherwise it stays
registered and we say why. Every version gets its model card (steps/model_card.py).
`promote` (steps/promote.py) passes an existing version through the same gate, or forces it: a rollback.
Every promotion is recorded in tags on the versions involved and in the model's `production_history`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException

from databases import catalogue
from databases.image_store import read_location
from steps import defaults, model_card
from steps.defaults import ALIAS, MODEL_NAME, STAGE
from steps.tracking import start_run
from team.preflight import one_line_errors

HISTORY_TAG = "production_history"  # on the registered model: one line per promotion, newest last
HISTORY_LINES = 40

log = logging.getLogger("register")

# Stages are deprecated in favour of aliases, but `models:/animal/Production` is what users serve:
# we set both, knowingly, so the deprecation warning is noise here.
warnings.filterwarnings("ignore", category=FutureWarning, module=__name__)


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    accuracy: float
    production_accuracy: float | None  # of the version that was Production before, if any
    reason: str


@dataclass(frozen=True)
class Evaluation:
    """A model on the validation split, as `mlflow.models.evaluate` measured it."""

    accuracy: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall
    confusion: dict  # {"labels": [...], "rows": [[count, ...], ...]}, rows: true class
    images: int
    result: mlflow.models.EvaluationResult
    run_id: str


def evaluate(model_uri: str, db_path: Path, batch: int = 256, model_id: str | None = None) -> Evaluation:
    """A served-model URI on the catalogue's validation split, through the pyfunc itself, then
    `mlflow.models.evaluate` on its answers, in a run of its own (nested in the active run)."""
    conn = catalogue.connect(db_path, readonly=True)
    try:
        val = catalogue.images(conn, split="val")
    finally:
        conn.close()
    if val.empty:
        raise ValueError(f"the catalogue {db_path} has no validation images")
    model = mlflow.pyfunc.load_model(model_uri)
    answers = []
    for start in range(0, len(val), batch):
        files = val.file.iloc[start : start + batch]
        answers.append(model.predict(pd.DataFrame({"image": [read_location(f) for f in files]}), params={"k": 0}))
    answers = pd.concat(answers, ignore_index=True)
    labels = sorted({*val.label, *next((p for p in answers.probabilities if p is not None), {})})
    # An unreadable image counts as wrong: its row has no label, and no probability for the truth.
    predicted = answers.label.fillna("(unreadable)").astype(str)
    probabilities = np.array([[(p or {}).get(label, 0.0) for label in labels] for p in answers.probabilities])
    frame = pd.DataFrame({"target": val.label.to_numpy(), "prediction": predicted.to_numpy()})
    name = f"evaluate {model_uri}"
    with mlflow.start_run(run_name=name, nested=True) if mlflow.active_run() else start_run(name) as run:
        mlflow.set_tag("evaluated_model", model_uri)
        # MLflow's classifier evaluator takes probabilities only from scikit-learn-like models, so
        # the ROC and calibration plots are ours, from the same answers, logged beside its own.
        result = mlflow.models.evaluate(
            data=frame,
            targets="target",
            predictions="prediction",
            model_type="classifier",
            evaluators=["default"],
            evaluator_config={"default": {"label_list": labels}},
            custom_artifacts=[probability_plots(val.label.to_numpy(), probabilities, labels)],
            model_id=model_id,
        )
    matrix = pd.crosstab(pd.Categorical(frame.target, labels), pd.Categorical(frame.prediction, labels), dropna=False)
    rows = matrix.to_numpy().tolist()
    per_class = {}
    for i, label in enumerate(labels):
        said, truth = sum(row[i] for row in rows), sum(rows[i])
        per_class[label] = {"precision": rows[i][i] / said if said else 0.0, "recall": rows[i][i] / truth if truth else 0.0}
    return Evaluation(
        float(result.metrics["accuracy_score"]), per_class, {"labels": labels, "rows": rows}, len(val), result, run.info.run_id
    )


def probability_plots(truth: np.ndarray, probabilities: np.ndarray, labels: list[str]):
    """A custom artifact for mlflow.models.evaluate: one-vs-rest ROC curves and a calibration curve."""

    def plots(eval_df, builtin_metrics, artifacts_dir):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from sklearn.calibration import calibration_curve
        from sklearn.metrics import auc, roc_curve

        figure, (roc, calibration) = plt.subplots(1, 2, figsize=(10, 4.2))
        for i, label in enumerate(labels):
            positive = truth == label
            if positive.all() or not positive.any():
                continue  # a ROC curve needs both classes
            fpr, tpr, _ = roc_curve(positive, probabilities[:, i])
            roc.plot(fpr, tpr, label=f"{label} (AUC {auc(fpr, tpr):.3f})")
        roc.plot([0, 1], [0, 1], ":", color="grey")
        roc.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, one class against the rest")
        roc.legend()
        confidence = probabilities.max(axis=1)
        right = np.asarray(labels)[probabilities.argmax(axis=1)] == truth
        observed, predicted = calibration_curve(right, confidence, n_bins=10, strategy="quantile")
        calibration.plot(predicted, observed, marker="o", label="model")
        calibration.plot([0, 1], [0, 1], ":", color="grey", label="perfectly calibrated")
        calibration.set(xlabel="confidence (top class)", ylabel="share right", title="Calibration")
        calibration.legend()
        figure.tight_layout()
        path = Path(artifacts_dir) / "roc_calibration.png"
        figure.savefig(path)
        plt.close(figure)
        return {"roc_and_calibration_plot": str(path)}

    return plots


def at_least_as_good(candidate: Evaluation, production: Evaluation) -> bool:
    """The gate's rule in MLflow's terms: candidate accuracy >= Production's, on the same split."""
    threshold = MetricThreshold(threshold=production.accuracy, greater_is_better=True)
    try:
        mlflow.validate_evaluation_results({"accuracy_score": threshold}, candidate.result, production.result)
    except ModelValidationFailedException:
        return False
    return True


def register(model_uri: str, db_path: Path, name: str = MODEL_NAME) -> Promotion:
    """Register a logged model (once: re-running finds the same version) and pass it through the gate."""
    client = MlflowClient()
    run_id = _run_id_of(model_uri)
    existing = _existing_version(client, name, model_uri, run_id)
    if existing is not None:
        return _evaluate_and_gate(client, name, existing, db_path)
    model_existed = _model_exists(client, name)
    registered = mlflow.register_model(model_uri, name)
    try:
        return _evaluate_and_gate(client, name, registered, db_path)
    except BaseException:
        # A failure midway (the catalogue, the image store or the tracking server gone) leaves the
        # registry as it was: the version this call created goes again.
        _forget(client, name, str(registered.version), model_existed)
        raise


def _evaluate_and_gate(client: MlflowClient, name: str, registered, db_path: Path) -> Promotion:
    number = str(registered.version)
    candidate = evaluate(f"models:/{name}/{number}", db_path, model_id=model_card.logged_model_id(registered))
    client.set_model_version_tag(name, number, "val_accuracy", f"{candidate.accuracy:.4f}")
    client.set_model_version_tag(name, number, "catalogue_sha256", _catalogue_hash(db_path))
    publish_card(client, name, number, registered.run_id, candidate)
    return _gate(client, name, number, candidate, db_path, force=False)


def _model_exists(client: MlflowClient, name: str) -> bool:
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def _forget(client: MlflowClient, name: str, version: str, model_existed: bool) -> None:
    try:
        client.delete_model_version(name, version)
        if not model_existed:
            client.delete_registered_model(name)
    except MlflowException as error:
        log.warning("could not remove version %s of %s after the failure: %s", version, name, error)


def promote(version: str, db_path: Path, force: bool = False, name: str = MODEL_NAME) -> Promotion:
    """Make an existing version Production again (a rollback, or a version the gate held back).

    It is scored on the current validation split against the current Production version and
    promoted only if at least as good, unless `force`. Raises LookupError for an unknown name or version.
    """
    client = MlflowClient()
    _check_version(client, name, str(version))
    candidate = evaluate(f"models:/{name}/{version}", db_path)
    client.set_model_version_tag(name, str(version), "val_accuracy", f"{candidate.accuracy:.4f}")
    return _gate(client, name, str(version), candidate, db_path, force=force)


def _gate(client: MlflowClient, name: str, number: str, candidate: Evaluation, db_path: Path, force: bool) -> Promotion:
    """Production goes to `number` if it is at least as good as the current Production version on the
    same validation split (MLflow's validation, at_least_as_good; or if forced); otherwise nothing
    changes and the version says why."""
    accuracy = candidate.accuracy
    current = _production_version(client, name)
    if current is not None and str(current.version) == number:
        return Promotion(number, True, accuracy, accuracy, "already Production")
    production = evaluate(f"models:/{name}/{current.version}", db_path) if current else None
    production_accuracy = production.accuracy if production else None
    worse = production is not None and not at_least_as_good(candidate, production)
    if worse and not force:
        reason = (
            f"not promoted: validation accuracy {accuracy:.4f} is below Production version "
            f"{current.version}'s {production_accuracy:.4f} on the same validation split"
        )
        client.set_model_version_tag(name, number, "promotion", reason)
        log.warning("version %s %s", number, reason)
        return Promotion(number, False, accuracy, production_accuracy, reason)

    if current is None:
        reason = "first Production version"
    elif worse:
        reason = (
            f"forced: {accuracy:.4f} < Production version {current.version}'s {production_accuracy:.4f}, promoted on request (force=true)"
        )
    else:
        reason = f"promoted: {accuracy:.4f} >= Production version {current.version}'s {production_accuracy:.4f}"
    _make_production(client, name, number, None if current is None else str(current.version), reason)
    log.info("version %s %s", number, reason)
    return Promotion(number, True, accuracy, production_accuracy, reason)


def _make_production(client: MlflowClient, name: str, number: str, previous: str | None, reason: str) -> None:
    """Stage and alias to `number`, the old version archived, and the story told in tags on both
    versions and in the registered model's `production_history`."""
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # The old Production version archived by a call of its own: MLflow 3.17.2's
    # archive_existing_versions=True fails on a PostgreSQL tracking server (mlflow/mlflow#24592).
    for version in client.get_latest_versions(name, stages=[STAGE]):  # no filter string: any name is safe
        if str(version.version) != number:
            client.transition_model_version_stage(name, version.version, "Archived")
    client.transition_model_version_stage(name, number, STAGE)
    client.set_registered_model_alias(name, ALIAS, number)
    for key, value in {"promotion": reason, "promoted_at": when, "replaced": previous or "none"}.items():
        client.set_model_version_tag(name, number, key, value)
    if previous is not None:
        client.set_model_version_tag(name, previous, "replaced_by", number)
        client.set_model_version_tag(name, previous, "replaced_at", when)
    line = f"{when} version {number} replaced {previous or 'none'}: {reason}"
    history = client.get_registered_model(name).tags.get(HISTORY_TAG, "")
    # Tag values are bounded in size: keep the newest promotions.
    client.set_registered_model_tag(name, HISTORY_TAG, "\n".join([*history.splitlines(), line][-HISTORY_LINES:]))


def _check_version(client: MlflowClient, name: str, version: str) -> None:
    """LookupError with a one-line message unless `name` has a version `version`."""
    try:
        client.get_registered_model(name)
    except MlflowException:
        raise LookupError(f"there is no registered model named {name!r}") from None
    try:
        client.get_model_version(name, version)
    except MlflowException:
        known = ""
        if re.fullmatch(r"[\w.-]+", name):  # safe inside MLflow's filter string, which takes no parameters
            numbers = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
            known = f" (versions: {', '.join(map(str, numbers))})"
        raise LookupError(f"{name} has no version {version!r}{known}") from None


def _catalogue_hash(db_path: Path) -> str:
    conn = catalogue.connect(db_path, readonly=True)
    try:
        return catalogue.content_hash(conn)
    finally:
        conn.close()


def publish_card(client: MlflowClient, name: str, version: str, run_id: str | None, evaluation: Evaluation) -> None:
    """The version's model card: the training run's facts plus this evaluation."""
    try:
        facts = mlflow.artifacts.load_dict(f"runs:/{run_id}/{model_card.FACTS_FILE}")
    except (MlflowException, OSError, ValueError):
        log.warning("version %s: its run has no %s (trained before model cards); no card", version, model_card.FACTS_FILE)
        return
    facts = model_card.registered_facts(
        facts, name, version, run_id, evaluation.accuracy, evaluation.per_class, evaluation.confusion, evaluation.images
    )
    model_card.publish(client, name, version, facts)


def _run_id_of(model_uri: str) -> str | None:
    try:
        return mlflow.get_logged_model(model_uri.removeprefix("models:/")).source_run_id
    except MlflowException:
        return None


def _existing_version(client: MlflowClient, name: str, model_uri: str, run_id: str | None):
    """The version already registered from this model, so that re-running registers nothing new."""
    if run_id is None or not re.fullmatch(r"[0-9a-f]{32}", run_id):
        return None
    try:
        versions = client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    except MlflowException:
        return None
    model_id = model_uri.removeprefix("models:/")
    return next((v for v in versions if v.source == model_uri or getattr(v, "model_id", None) == model_id), None)


def _production_version(client: MlflowClient, name: str):
    try:
        return client.get_model_version_by_alias(name, ALIAS)
    except MlflowException:
        pass
    try:
        versions = client.get_latest_versions(name, stages=[STAGE])
    except MlflowException:
        return None
    return versions[0] if versions else None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", required=True, help="e.g. models:/m-<id> or runs:/<run id>/model")
    parser.add_argument("--db", type=catalogue.location, default=defaults.CATALOGUE)
    parser.add_argument("--name", default=MODEL_NAME)
    return parser


@one_line_errors("register")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with start_run("register"):  # the evaluations nest in it
        result = register(args.model_uri, args.db, args.name)
    print(f"register: {args.name} version {result.version}: {result.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
