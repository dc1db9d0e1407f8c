"""The naive way, as the common MLflow + Keras tutorials serve an image classifier (bench/serving.py)."""
