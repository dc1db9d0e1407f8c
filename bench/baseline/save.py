"""Save the naive baseline from the Keras model inside one of our `animal` model versions."""

from __future__ import annotations

import warnings
from pathlib import Path

import mlflow
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from pyfunc.model import KERAS_PACKAGES, pip_requirements

MODEL_FILE = Path(__file__).with_name("naive_model.py")


def save_baseline(animal_model_uri: str, path: Path) -> Path:
    """The same classifier.keras and config.json as `animal_model_uri`, wrapped the naive way."""
    local = Path(mlflow.artifacts.download_artifacts(animal_model_uri, dst_path=str(path.parent / "animal")))
    artifacts = {"keras_model": str(local / "artifacts" / "classifier.keras"), "config": str(local / "artifacts" / "config.json")}
    with warnings.catch_warnings():  # no input example: it would only load the model once more
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        mlflow.pyfunc.save_model(
            path=str(path),
            python_model=str(MODEL_FILE),
            artifacts=artifacts,
            pip_requirements=pip_requirements(KERAS_PACKAGES),  # the naive way runs Keras
            # The same input schema as ours, so the server parses and checks requests the same way.
            signature=ModelSignature(inputs=Schema([ColSpec("string", "image")])),
        )
    return path
