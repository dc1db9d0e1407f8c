"""The upload page: a small Flask app in front of `mlflow models serve` (see web/app.py)."""
