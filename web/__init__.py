"""The upload page: a small Flask app in front of `mlflow models serve` (see web/app.py)."""

import pyfunc  # noqa: F401  (the TensorFlow environment, set before TensorFlow loads)
