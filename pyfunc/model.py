"""The served model `animal`: preprocessing + the network on ONNX Runtime + recommender, as one
MLflow pyfunc.

Input: a DataFrame with a column `image` (base64 text or raw bytes of an image file).
Output: one row per image with label, confidence, probabilities, uncertain, similar, error,
unfamiliar and familiarity. The contract is in docs/design.md ("The served model").

Serving imports neither TensorFlow nor Keras: the network runs from the ONNX graph logged beside
the Keras model (pyfunc/onnx_export.py made and checked it at logging). Models logged before the
ONNX graph existed, or any model with ANIMAL_RUNTIME=keras, run the Keras model instead (TensorFlow
imported then, and only then).
"""

from __future__ import annotations

import hashlib
import json
import os
from importlib.metadata import version
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from pyfunc.familiarity import Familiarity
from pyfunc.preprocess import MAX_PIXELS, ImageError, decode_payload, load_image, request_problem
from pyfunc.recommender import Recommender

EMBEDDING_LAYER = "embedding"
DEFAULT_K = 5
DEFAULT_THRESHOLD = 0.6
MAX_K = 100
BATCH = 256  # images per forward pass: bounds memory for large requests
# Fewer of them for larger inputs: the activations grow with the pixels, and MobileNetV2 at 224 px
# in passes of 256 held 6.8 GB in `score` (bench/onnx_runtime.py); 64 px networks keep 256.
FORWARD_PIXELS = BATCH * 64 * 64
# One request must finish well within the scoring server's timeout (60 s): bigger ones are refused
# up front (docs/reliability.md has the measured times); batch work goes to `score`.
MAX_ROWS = 1000
MAX_REQUEST_PIXELS = 200_000_000
# "keras": run the Keras model even where an ONNX graph was logged (the bench's side-by-side).
RUNTIME_VARIABLE = "ANIMAL_RUNTIME"
# ONNX Runtime's intra-op threads (default: the cores this process may run on).
THREADS_VARIABLE = "ANIMAL_ONNX_THREADS"
OUTPUT_COLUMNS = ["label", "confidence", "probabilities", "uncertain", "similar", "error", "unfamiliar", "familiarity"]


def signature(labels: list[str]) -> ModelSignature:
    """Input, output and params of the model, as MLflow shows and checks them."""
    similar = Array(Object([Property("id", "long"), Property("path", "string"), Property("label", "string"), Property("score", "double")]))
    return ModelSignature(
        inputs=Schema([ColSpec("string", "image")]),  # base64 text; raw bytes pass too in Python
        outputs=Schema(
            [
                ColSpec("string", "label", required=False),
                ColSpec("double", "confidence", required=False),
                ColSpec(Object([Property(label, "double") for label in labels]), "probabilities", required=False),
                ColSpec("boolean", "uncertain", required=False),
                ColSpec(similar, "similar"),
                ColSpec("string", "error", required=False),
                ColSpec("boolean", "unfamiliar", required=False),
                ColSpec("double", "familiarity", required=False),
            ]
        ),
        params=ParamSchema([ParamSpec("k", "long", DEFAULT_K), ParamSpec("threshold", "double", DEFAULT_THRESHOLD)]),
    )


def with_embedding(classifier, taps: list[str] | tuple[str, ...] = ()):
    """The classifier as a model with outputs probabilities, embedding and the `taps` layers'
    activations (averaged over space): one forward pass answers "which animal", "which images are
    similar" and "how familiar is this image"."""
    import keras

    def spatial_mean(tensor):
        return keras.ops.mean(tensor, axis=(1, 2)) if len(tensor.shape) == 4 else tensor

    outputs = [classifier.get_layer(EMBEDDING_LAYER).output, *(spatial_mean(classifier.get_layer(name).output) for name in taps)]
    return keras.Model(classifier.inputs, [classifier.outputs[0], *outputs])


def session_options():
    """One intra-op pool per process, sized to the cores it may use (or ANIMAL_ONNX_THREADS), and
    no inter-op pool: a graph of one chain of layers has nothing to run beside itself. Concurrent
    `predict` calls (score's threads, the server's) share the session's one pool. Idle pool threads
    sleep instead of spinning, so that they leave the cores to the threads that decode images
    beside them (score, the server's other requests)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    options.intra_op_num_threads = int(os.environ.get(THREADS_VARIABLE) or cores)
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


class AnimalModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.labels: list[str] = config["labels"]
        self.image_size: int = config["image_size"]
        self.max_pixels: int = config.get("max_pixels", MAX_PIXELS)
        self.batch = max(1, min(BATCH, FORWARD_PIXELS // self.image_size**2))
        self.familiarity = Familiarity.load(context.artifacts["familiarity"])
        if "onnx_model" in context.artifacts and os.environ.get(RUNTIME_VARIABLE, "onnx").lower() != "keras":
            self._forward = self._onnx_forward(context.artifacts["onnx_model"], config["onnx"])
        else:
            self._forward = self._keras_forward(context.artifacts["keras_model"], config["familiarity"]["layers"])
        self._forward(np.zeros((1, self.image_size, self.image_size, 3), np.uint8))  # first-call set-up now, not in a request
        self.recommender = Recommender(context.artifacts["recommender"])

    def _onnx_forward(self, path: str, onnx: dict):
        import onnxruntime

        session = onnxruntime.InferenceSession(path, session_options(), providers=["CPUExecutionProvider"])
        outputs, feed = onnx["outputs"], onnx["input"]
        self.runtime = f"onnxruntime {onnxruntime.__version__}"
        return lambda images: session.run(outputs, {feed: images})

    def _keras_forward(self, path: str, taps: list[str]):
        import keras
        import tensorflow as tf

        network = with_embedding(keras.models.load_model(path, compile=False), taps)
        self.runtime = f"tensorflow {tf.__version__}"
        # One traced graph for every batch size: an eager Keras call pays Python dispatch for each
        # layer, several times the cost of the arithmetic for one small image (bench/serving.py).
        return tf.function(
            lambda images: network(images, training=False),
            input_signature=[tf.TensorSpec([None, self.image_size, self.image_size, 3], tf.uint8)],
        )

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        k, threshold = _read_params(params or {})
        if not isinstance(model_input, pd.DataFrame) or "image" not in model_input.columns:
            raise MlflowException(
                "the input needs a column named 'image' (base64-encoded image file bytes)",
                error_code=INVALID_PARAMETER_VALUE,
            )
        # Only under `mlflow models serve` (which sets this variable): batch scoring in Python has no timeout.
        serving = os.environ.get("_MLFLOW_IS_IN_SERVING_ENVIRONMENT", "").lower() == "true"
        if serving and (problem := request_problem(model_input["image"], MAX_ROWS, MAX_REQUEST_PIXELS)):
            raise MlflowException(problem, error_code=INVALID_PARAMETER_VALUE)
        rows: list[dict] = []
        arrays: list[np.ndarray] = []
        readable: list[int] = []
        digests: list[str] = []  # of each readable input's bytes: its similar images leave it out
        for value in model_input["image"]:
            try:
                payload = decode_payload(value)
                arrays.append(load_image(payload, self.image_size, self.max_pixels))
                digests.append(hashlib.sha256(payload).hexdigest())
                readable.append(len(rows))
                rows.append({})
            except ImageError as error:
                rows.append(_error_row(str(error)))
        for start in range(0, len(arrays), self.batch):
            batch = np.stack(arrays[start : start + self.batch])
            probabilities, embeddings, *taps = (np.asarray(t) for t in self._forward(batch))
            distances = self.familiarity.distances(self.familiarity.features(taps))
            familiarity, flagged = self.familiarity.scores_of_distances(distances), self.familiarity.flagged(distances)
            for index, p, e, f, u, d in zip(
                readable[start : start + self.batch], probabilities, embeddings, familiarity, flagged, digests[start : start + self.batch]
            ):
                rows[index] = self._answer(p, e, f, bool(u), k, threshold, d)
        return pd.DataFrame(rows, columns=OUTPUT_COLUMNS, dtype=object)

    def _answer(
        self,
        probabilities: np.ndarray,
        embedding: np.ndarray,
        familiarity: float,
        unfamiliar: bool,
        k: int,
        threshold: float,
        digest: str | None = None,
    ) -> dict:
        best = int(np.argmax(probabilities))
        label, confidence = self.labels[best], float(probabilities[best])
        return {
            "label": label,
            "confidence": round(confidence, 6),
            "probabilities": {name: round(float(p), 6) for name, p in zip(self.labels, probabilities)},
            "uncertain": confidence < threshold,
            "similar": self.recommender.similar(embedding, label, k, exclude=digest),
            "error": None,
            "unfamiliar": unfamiliar,
            "familiarity": round(float(familiarity), 6),
        }


def _error_row(message: str) -> dict:
    return {
        "label": None,
        "confidence": None,
        "probabilities": None,
        "uncertain": None,
        "similar": [],
        "error": message,
        "unfamiliar": None,
        "familiarity": None,
    }


def _read_params(params: dict) -> tuple[int, float]:
    try:
        k = int(params.get("k", DEFAULT_K))
        threshold = float(params.get("threshold", DEFAULT_THRESHOLD))
    except (TypeError, ValueError):
        raise MlflowException("params: k must be an integer, threshold a number", error_code=INVALID_PARAMETER_VALUE) from None
    if not 0 <= k <= MAX_K or not 0.0 <= threshold <= 1.0:
        raise MlflowException(f"params: k must be in 0..{MAX_K}, threshold in 0..1", error_code=INVALID_PARAMETER_VALUE)
    return k, threshold


INFERENCE_PACKAGES = ["mlflow", "onnxruntime", "numpy", "pandas", "pillow"]
KERAS_PACKAGES = ["mlflow", "tensorflow-cpu", "keras", "numpy", "pandas", "pillow"]


def pip_requirements(packages: list[str] = INFERENCE_PACKAGES) -> list[str]:
    """What the served model needs, pinned to what trained it (MLflow's inference of them misses
    pillow and onnxruntime). Inference only: the network runs on ONNX Runtime, so serving, `score`
    and Spark's workers install no TensorFlow. KERAS_PACKAGES: for a model served through Keras."""
    return [f"{name}=={version(name)}" for name in packages]


def log_animal_model(
    classifier,
    labels: list[str],
    image_size: int,
    gallery_db: Path,
    example_image: bytes,
    workdir: Path,
    familiarity: Familiarity,
    familiarity_layers: list[str],
    check_images: np.ndarray,
    name: str = "model",
):
    """Log the pyfunc `animal` model in the active run; returns MLflow's ModelInfo.

    `familiarity` was fitted on the pooled activations of `familiarity_layers` (with_embedding's taps).
    The network is exported to ONNX and compared with Keras on `check_images` (validation images,
    uint8, as load_image makes them): beyond the tolerance, ExportMismatch and nothing is logged."""
    import base64

    from pyfunc.onnx_export import INPUT_NAME, export_checked

    workdir.mkdir(parents=True, exist_ok=True)
    keras_path = workdir / "classifier.keras"
    classifier.save(keras_path)
    onnx_path = workdir / "network.onnx"
    outputs, difference = export_checked(with_embedding(classifier, familiarity_layers), image_size, onnx_path, check_images)
    config_path = workdir / "config.json"
    familiarity_path = workdir / "familiarity.npz"
    familiarity.save(familiarity_path)
    config_path.write_text(
        json.dumps(
            {
                "labels": list(labels),
                "image_size": image_size,
                "max_pixels": MAX_PIXELS,
                # The statistics are in familiarity.npz; these are for people reading the model's files.
                "familiarity": {
                    "layers": list(familiarity_layers),
                    "signal": familiarity.signal,
                    "threshold": familiarity.threshold,
                    "flag_share": familiarity.flag_share,
                    "floor": familiarity.floor,
                },
                # The graph's outputs in with_embedding's order: probabilities, embedding, taps.
                "onnx": {"input": INPUT_NAME, "outputs": outputs, "checked_difference": difference},
            },
            indent=2,
        )
    )
    return mlflow.pyfunc.log_model(
        name=name,
        python_model=AnimalModel(),
        artifacts={
            "keras_model": str(keras_path),
            "onnx_model": str(onnx_path),
            "config": str(config_path),
            "recommender": str(gallery_db),
            "familiarity": str(familiarity_path),
        },
        code_paths=[str(Path(__file__).parent)],
        pip_requirements=pip_requirements(),
        signature=signature(labels),
        input_example=(
            pd.DataFrame({"image": [base64.b64encode(example_image).decode("ascii")]}),
            {"k": DEFAULT_K, "threshold": DEFAULT_THRESHOLD},
        ),
    )
