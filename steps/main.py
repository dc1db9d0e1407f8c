"""main: extract -> populate -> train -> register -> promote, each step a child run of this one."""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from steps.register import ALIAS, MODEL_NAME, register
from steps.train import MODEL_TAG

PROJECT = str(Path(__file__).resolve().parents[1])


def run_step(entry_point: str, parameters: dict) -> mlflow.entities.Run:
    """Run one MLproject entry point synchronously (a nested run) and return its finished run."""
    print(f"\n=== {entry_point} ===", flush=True)
    submitted = mlflow.projects.run(PROJECT, entry_point, parameters=parameters, env_manager="local",
                                    synchronous=True)
    return MlflowClient().get_run(submitted.run_id)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", default="synthetic")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--db", type=Path, default=Path("databases/animal.db"))
    parser.add_argument("--images-per-class", type=int, default=600)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    image_store, metadata = (args.data_dir / "images").resolve(), (args.data_dir / "metadata.csv").resolve()
    db = args.db.resolve()

    with mlflow.start_run() as parent:
        mlflow.log_params(vars(args))
        run_step("extract", {"source": args.source, "image_store": image_store, "metadata": metadata,
                             "images_per_class": args.images_per_class, "seed": args.seed})
        run_step("populate", {"metadata": metadata, "image_store": image_store, "db": db})
        trained = run_step("train", {"db": db, "image_size": args.image_size, "epochs": args.epochs,
                                     "seed": args.seed})
        print(f"\n=== register ===", flush=True)
        promotion = register(trained.data.tags[MODEL_TAG], db)
        mlflow.log_metrics({"val_accuracy": promotion.accuracy, "promoted": float(promotion.promoted)})
        mlflow.set_tags({"model_version": promotion.version, "promotion": promotion.reason})

    minutes, seconds = divmod(round(time.monotonic() - started), 60)
    print(f"""
=== summary ===
pipeline run      {parent.info.run_id}  (train run {trained.info.run_id})
validation acc.   {promotion.accuracy:.4f}
model             {MODEL_NAME} version {promotion.version}
promoted          {"yes" if promotion.promoted else "no"} ({promotion.reason})
took              {minutes} min {seconds} s
serve it          mlflow models serve -m models:/{MODEL_NAME}@{ALIAS} -p 5001 --env-manager local
look at runs      mlflow ui --backend-store-uri sqlite:///mlflow.db""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
