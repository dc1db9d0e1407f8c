"""main: extract -> populate -> train -> register -> promote, each step a child run of this one.

Every flag of `train` is a flag of `main` too and is forwarded as given, so
`mlflow run . -P conv_blocks=4` trains the same network as `mlflow run . -e train -P conv_blocks=4`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from databases import catalogue
from databases.image_store import absolute
from steps import backbones, defaults
from steps.backbones import IMAGENET, NO_WEIGHTS
from steps.defaults import ALIAS, MODEL_NAME, Hyperparameters
from steps.register import register
from steps.tracking import followed, start_run
from steps.train import MODEL_TAG, add_hyperparameter_flags, hyperparameters_from
from team.preflight import one_line_errors

PROJECT = str(Path(__file__).resolve().parents[1])


def own_catalogue(source: str, data_dir: Path, db: Path | str) -> tuple[Path, Path | str]:
    """(data_dir, db) for `source`: photos given with the default data_dir and db get their own,
    data/<name>/ and databases/<name>.db (name: the folder's or .zip's), so that they never mix
    with the synthetic catalogue and the gate compares candidates on the same photos."""
    if source == defaults.SOURCE or data_dir != defaults.DATA_DIR or db != defaults.CATALOGUE:
        return data_dir, db
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(source.rstrip("/")).name.removesuffix(".zip")).strip(".-") or "photos"
    if name == defaults.CATALOGUE.stem:  # not the synthetic default's own file
        name += "-photos"
    return data_dir / name, defaults.CATALOGUE.with_name(f"{name}.db")


class StepFailed(RuntimeError):
    """A step's process ended with an error, which it has printed."""


def run_step(entry_point: str, parameters: dict) -> mlflow.entities.Run:
    """Run one MLproject entry point synchronously (a nested run) and return its finished run."""
    print(f"\n=== {entry_point} ===", flush=True)
    try:
        submitted = mlflow.projects.run(PROJECT, entry_point, parameters=parameters, env_manager="local", synchronous=True)
    except mlflow.projects.ExecutionException:  # the step printed its own error: no traceback over it
        raise StepFailed(f"the {entry_point} step failed (its error is above)") from None
    return MlflowClient().get_run(followed(submitted.run_id))  # the step may have left Default (steps/tracking.py)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=defaults.SOURCE, help="'synthetic' or an AFHQ folder or .zip")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=defaults.DATA_DIR,
        help="the metadata CSV goes here, and the images too (images/) unless --image-store says where",
    )
    parser.add_argument(
        "--image-store",
        default=defaults.MAIN_IMAGE_STORE,
        help="a folder or s3://bucket/prefix for the images (default: <data-dir>/images)",
    )
    parser.add_argument("--db", type=catalogue.location, default=defaults.CATALOGUE)
    parser.add_argument("--images-per-class", type=int, default=defaults.IMAGES_PER_CLASS)
    parser.add_argument(
        "--synthetic-size",
        type=int,
        default=defaults.SYNTHETIC_SIZE,
        help="synthetic only: pixels per side of the image files (512: AFHQ's)",
    )
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    parser.add_argument("--patience", type=int, default=defaults.PATIENCE)
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    add_hyperparameter_flags(parser)
    return parser


@one_line_errors("main")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    started = time.monotonic()
    args.data_dir, args.db = own_catalogue(args.source, args.data_dir, args.db)
    metadata = (args.data_dir / "metadata.csv").resolve()
    image_store = absolute(args.image_store or args.data_dir / "images")  # the steps run in the project folder
    db = args.db.resolve() if isinstance(args.db, Path) else args.db
    hp = hyperparameters_from(args)
    if hp.weights not in (IMAGENET, NO_WEIGHTS):  # a weights file: train runs in the project folder
        hp = replace(hp, weights=str(Path(hp.weights).resolve()))
    try:
        backbones.check(hp.backbone, hp.weights, hp.head)
        if hp.backbone != backbones.CNN:  # missing weights: one line now, not after extracting everything
            backbones.weights_file(hp.backbone, hp.weights, hp.head)
        return pipeline(args, hp, metadata, image_store, db, started)
    except (ValueError, StepFailed) as error:  # WeightsUnavailable is a ValueError
        print(f"main: error: {error}", file=sys.stderr)
        return 2


def pipeline(args: argparse.Namespace, hp: Hyperparameters, metadata: Path, image_store: str | Path, db: Path | str, started: float) -> int:
    """The steps, each a child run of one `main` run; then the summary."""
    with start_run("main") as parent:
        run_step(
            "extract",
            {
                "source": args.source,
                "image_store": image_store,
                "metadata": metadata,
                "images_per_class": args.images_per_class,
                "seed": args.seed,
                "synthetic_size": args.synthetic_size,
            },
        )
        run_step("populate", {"metadata": metadata, "image_store": image_store, "db": db})
        trained = run_step(
            "train",
            {"db": db, "image_size": args.image_size, "epochs": args.epochs, "patience": args.patience, "seed": args.seed, **asdict(hp)},
        )
        print("\n=== register ===", flush=True)
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
the page          python -m web.serve --db {db} --image-store {image_store}
look at runs      mlflow ui --backend-store-uri {mlflow.get_tracking_uri()}""")
    return 0


if __name__ == "__main__":
    sys.exit(main())
