"""register: a logged model -> registered model `animal`, promoted through the gate.

The gate scores the new version and the current Production version on the catalogue's current
validation split. The new one becomes Production (stage, archiving the old) and gets the alias
`production` only if it is at least as good; otherwise it stays registered and we say why.
"""
from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from databases import catalogue
from steps import defaults
from steps.defaults import ALIAS, MODEL_NAME, STAGE

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
    client = MlflowClient()
    run_id = _run_id_of(model_uri)
    registered = _existing_version(client, name, model_uri, run_id) or mlflow.register_model(model_uri, name)
    number = str(registered.version)
    accuracy = evaluate(f"models:/{name}/{number}", db_path)
    conn = catalogue.connect(db_path, readonly=True)
    try:
        content_hash = catalogue.content_hash(conn)
    finally:
        conn.close()
    client.set_model_version_tag(name, number, "val_accuracy", f"{accuracy:.4f}")
    client.set_model_version_tag(name, number, "catalogue_sha256", content_hash)

    current = _production_version(client, name)
    if current is not None and str(current.version) == number:
        return Promotion(number, True, accuracy, accuracy, "already Production")
    production_accuracy = evaluate(f"models:/{name}/{current.version}", db_path) if current else None
    if production_accuracy is not None and accuracy < production_accuracy:
        reason = (f"not promoted: validation accuracy {accuracy:.4f} is below Production version "
                  f"{current.version}'s {production_accuracy:.4f} on the same validation split")
        client.set_model_version_tag(name, number, "promotion", reason)
        log.warning("version %s %s", number, reason)
        return Promotion(number, False, accuracy, production_accuracy, reason)

    client.transition_model_version_stage(name, number, STAGE, archive_existing_versions=True)
    client.set_registered_model_alias(name, ALIAS, number)
    reason = ("first Production version" if current is None else
              f"promoted: {accuracy:.4f} >= Production version {current.version}'s {production_accuracy:.4f}")
    client.set_model_version_tag(name, number, "promotion", reason)
    log.info("version %s %s", number, reason)
    return Promotion(number, True, accuracy, production_accuracy, reason)


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
