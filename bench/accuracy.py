"""Accuracy: the Production model, per class, on the synthetic validation split and on real photos.

The real photos are the AFHQ sample (bench.common.AFHQ_SAMPLE, when present), all 57 of them:
the model never saw them. A model trained on the synthetic drawings is not expected to know real
cats from real dogs; this report says how far off it is instead of hiding it.

    python -m bench.accuracy [--model-uri models:/animal/Production] [--photos <folder of photos>]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import AFHQ_SAMPLE, RESULTS, catalogue_rows, machine, setup, table
from steps import defaults


def predict(model_uri: str, files: list[Path], batch: int = 256) -> pd.DataFrame:
    """The served model's rows for image files, through the pyfunc as `mlflow models serve` runs it."""
    import mlflow

    model = mlflow.pyfunc.load_model(model_uri)
    parts = [
        model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files[i : i + batch]]}), params={"k": 0})
        for i in range(0, len(files), batch)
    ]
    return pd.concat(parts, ignore_index=True)


def report(title: str, truth: list[str], answers: pd.DataFrame, labels: list[str]) -> float:
    """Per-class precision/recall/support and the confusion matrix; returns accuracy."""
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

    predicted = answers.label.fillna("(unreadable)").tolist()
    precision, recall, f1, support = precision_recall_fscore_support(truth, predicted, labels=labels, zero_division=0)
    accuracy = float(np.mean(np.asarray(predicted) == np.asarray(truth)))
    majority = max(truth.count(label) for label in labels) / len(truth)
    rows = [[label, p, r, f, int(s), int(predicted.count(label))] for label, p, r, f, s in zip(labels, precision, recall, f1, support)]
    rows.append(["all", "", "", "", len(truth), f"accuracy {accuracy:.3f}"])
    table(
        f"{title}: {len(truth)} images, accuracy {accuracy:.3f} (chance 0.333, majority class {majority:.3f}), "
        f"mean confidence {answers.confidence.astype(float).mean():.3f}",
        ["class", "precision", "recall", "f1", "support", "predicted as"],
        rows,
    )
    matrix = confusion_matrix(truth, predicted, labels=labels)
    table(
        f"{title}: confusion (rows: true, columns: predicted)",
        ["true \\ predicted", *labels],
        [[label, *map(int, row)] for label, row in zip(labels, matrix)],
    )
    return accuracy


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-uri", help="default: models:/animal/Production (made here if none)")
    parser.add_argument("--db", type=Path, help="its catalogue, with --model-uri (default: databases/animal.db)")
    parser.add_argument("--photos", type=Path, default=AFHQ_SAMPLE, help="real photos laid out {split}/{label}/*")
    parser.add_argument("--workdir", type=Path, default=RESULTS / "pipeline")
    parser.add_argument("--images-per-class", type=int, default=defaults.IMAGES_PER_CLASS)
    parser.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    args = parser.parse_args(argv)

    model = setup(args.model_uri, args.workdir, args.images_per_class, epochs=args.epochs, db=args.db)
    print(f"machine: {machine()}\nmodel: {model.model_uri} from {model.origin}", flush=True)
    val = catalogue_rows(model.db, split="val")
    labels = sorted(val.label.unique())
    synthetic = report(
        f"Validation split of {model.db.name}", val.label.tolist(), predict(model.model_uri, [Path(f) for f in val.file]), labels
    )
    photos = sorted(p for p in args.photos.glob("*/*/*") if p.is_file() and p.parent.name in labels)
    if not photos:
        print(f"\nno real photos at {args.photos}: skipped")
        return 0
    answers = predict(model.model_uri, photos)
    real = report(f"Real AFHQ photos ({args.photos.name})", [p.parent.name for p in photos], answers, labels)
    top = answers.label.value_counts()
    confidence = answers.confidence.astype(float).mean()
    print(
        f"\nsynthetic validation {synthetic:.3f}, real photos {real:.3f} (chance 0.333; it answers "
        f"'{top.index[0]}' for {top.iloc[0]} of {len(photos)}, with mean confidence {confidence:.2f}): "
        + (
            "what is learnt from the synthetic drawings does not carry over to real photos usefully; train on AFHQ for real use"
            if real < 0.8
            else "it carries over to real photos"
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
