"""The tutorial way to serve the same Keras model: decode and resize each image with PIL, then
`model.predict` it on its own. Logged as an MLflow "model from code" (this file is the model), so
it is served by the very same `mlflow models serve` as ours, with nothing of ours imported.

Kept deliberately plain; it is the yardstick, not a straw man: no per-request model loading, no
progress bar, the same uint8 input our network rescales itself.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from PIL import Image


class NaiveModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import keras

        config = json.loads(Path(context.artifacts["config"]).read_text())
        self.labels, self.image_size = config["labels"], config["image_size"]
        self.model = keras.models.load_model(context.artifacts["keras_model"], compile=False)

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        rows = []
        for value in model_input["image"]:
            image = Image.open(io.BytesIO(base64.b64decode(value))).convert("RGB")
            image = image.resize((self.image_size, self.image_size))
            probabilities = self.model.predict(np.expand_dims(np.array(image), 0), verbose=0)[0]
            best = int(np.argmax(probabilities))
            rows.append(
                {
                    "label": self.labels[best],
                    "confidence": float(probabilities[best]),
                    "probabilities": dict(zip(self.labels, map(float, probabilities))),
                }
            )
        return pd.DataFrame(rows)


mlflow.models.set_model(NaiveModel())
