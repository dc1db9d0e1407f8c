"""The served model: preprocessing, recommender and the `animal` pyfunc.

Importing this package sets the environment that TensorFlow and MLflow read when they load: the
one place the project sets it. `steps`, `web`, `bench` and `tests` import it from their own
`__init__`, so it is in force before any of their modules imports TensorFlow.
"""

import os

# TensorFlow's C++ chatter (CPU features, kernel notices) would bury the training log. Not all of
# it: the one-line "oneDNN custom operations are on" notice is printed before TensorFlow reads this
# setting. oneDNN itself stays on, TensorFlow's default: off, training was 3x slower
# (docs/performance.md).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# MLflow's per-file upload bars interleave with the training log; the steps print their own.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
