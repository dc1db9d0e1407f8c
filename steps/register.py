"""register: a logged model -> registered model `animal`, promoted through the gate.

The gate scores the new version and the current Production version on the catalogue's current
validation split. The new one becomes Production (stage, archiving the old) and gets the alias
`production` only if it is at least as good; otherwise it stays registered and we say why.
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
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from databases import catalogue
from steps import defaults
from steps.defaults import ALIAS, MODEL_NAME, STAGE

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


def evaluate(model_uri: str, db_path: Path, batch: int = 256) -> float:
    """Accuracy of a served-model URI on the catalogue's validation split, through the pyfunc itself."""
    import pandas as pd

    conn = catalogue.connect(db_path, readonly=True)
    try:
        val = catalogue.images(conn, split="val")
    finally:
        conn.close()
    if val.empty:
        raise ValueError(f"the catalogue {db_path} has no validation images")
    model = mlflow.pyfunc.load_model(model_uri)
    predicted: list[str] = []
    for start in range(0, len(val), batch):
        files = val.file.iloc[start : start + batch]
        frame = pd.DataFrame({"image": [Path(f).read_bytes() for f in files]})
        predicted += model.predict(frame, params={"k": 0}).label.tolist()
    return float(np.mean(np.asarray(predicted, dtype=object) == val.label.to_numpy()))


def register(model_uri: str, db_path: Path, name: str = MODEL_NAME) -> Promotion:
    """Register a logged model (once: re-running finds the same version) and pass it through the gate."""
    client = MlflowClient()
    run_id = _run_id_of(model_uri)
    registered = _existing_version(client, name, model_uri, run_id) or mlflow.register_model(model_uri, name)
    number = str(registered.version)
    accuracy = evaluate(f"models:/{name}/{number}", db_path)
    client.set_model_version_tag(name, number, "val_accuracy", f"{accuracy:.4f}")
    client.set_model_version_tag(name, number, "catalogue_sha256", _catalogue_hash(db_path))
    return _gate(client, name, number, accuracy, db_path, force=False)


def promote(version: str, db_path: Path, force: bool = False, name: str = MODEL_NAME) -> Promotion:
    """Make an existing version Production again (a rollback, or a version the gate held back).

    It is scored on the current validation split against the current Production version and
    promoted only if at least as good, unless `force`. Raises LookupError for an unknown name or version.
    """
    client = MlflowClient()
    _check_version(client, name, str(version))
    accuracy = evaluate(f"models:/{name}/{version}", db_path)
    client.set_model_version_tag(name, str(version), "val_accuracy", f"{accuracy:.4f}")
    return _gate(client, name, str(version), accuracy, db_path, force=force)


def _gate(client: MlflowClient, name: str, number: str, accuracy: float, db_path: Path, force: bool) -> Promotion:
    """Production goes to `number` if it is at least as good as the current Production version on the
    same validation split (or if forced); otherwise nothing changes and the version says why."""
    current = _production_version(client, name)
    if current is not None and str(current.version) == number:
        return Promotion(number, True, accuracy, accuracy, "already Production")
    production_accuracy = evaluate(f"models:/{name}/{current.version}", db_path) if current else None
    worse = production_accuracy is not None and accuracy < production_accuracy
    if worse and not force:
        reason = (f"not promoted: validation accuracy {accuracy:.4f} is below Production version "
                  f"{current.version}'s {production_accuracy:.4f} on the same validation split")
        client.set_model_version_tag(name, number, "promotion", reason)
        log.warning("version %s %s", number, reason)
        return Promotion(number, False, accuracy, production_accuracy, reason)

    if current is None:
        reason = "first Production version"
    elif worse:
        reason = (f"forced: {accuracy:.4f} < Production version {current.version}'s "
                  f"{production_accuracy:.4f}, promoted on request (force=true)")
    else:
        reason = f"promoted: {accuracy:.4f} >= Production version {current.version}'s {production_accuracy:.4f}"
    _make_production(client, name, number, None if current is None else str(current.version), reason)
    log.info("version %s %s", number, reason)
    return Promotion(number, True, accuracy, production_accuracy, reason)


def _make_production(client: MlflowClient, name: str, number: str, previous: str | None, reason: str) -> None:
    """Stage and alias to `number`, the old version archived, and the story told in tags on both
    versions and in the registered model's `production_history`."""
    when = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    client.transition_model_version_stage(name, number, STAGE, archive_existing_versions=True)
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
    parser.add_argument("--db", type=Path, default=defaults.CATALOGUE)
    parser.add_argument("--name", default=MODEL_NAME)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    result = register(args.model_uri, args.db, args.name)
    print(f"register: {args.name} version {result.version}: {result.reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
