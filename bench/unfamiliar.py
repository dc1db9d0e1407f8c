"""Does `unfamiliar` tell real photos from the synthetic drawings a model was trained on?

    python -m bench.unfamiliar [--real <AFHQ-like folder>] [--model-uri URI --db CATALOGUE]

With the synthetic-trained model, through the served pyfunc itself: the share of real photos
flagged `unfamiliar` (target: at least 90%), the share of the synthetic validation images flagged
(the threshold was calibrated on them: about 5% by construction), the share of fresh synthetic
images flagged (never seen in training nor calibration: the false-alarm rate out of sample), and
the AUROC of `familiarity` between real photos and synthetic images (target: at least 0.95).

Without --model-uri, a model is trained the project's default way (600 synthetic images per class,
`steps.train.train` with its defaults) into bench/results/unfamiliar/, with its own tracking store;
later runs reuse it. The real photos: every image under --real (AFHQ layout or any folders).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.common import AFHQ_SAMPLE, RESULTS, _synthetic_catalogue, catalogue_rows, machine, table

WORKDIR = RESULTS / "unfamiliar"
FRESH_SEED, FRESH_PER_CLASS = 2026, 100
IMAGE_TYPES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif"}


def bench_store(workdir: Path) -> Path:
    """The synthetic default catalogued in workdir, and workdir's MLflow store and "bench" experiment
    made current; returns the catalogue."""
    import mlflow

    db = _synthetic_catalogue(workdir, 600)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    if mlflow.get_experiment_by_name("bench") is None:
        mlflow.create_experiment("bench", artifact_location=(workdir / "artifacts").as_uri())
    mlflow.set_experiment("bench")
    return db


def default_model(workdir: Path) -> tuple[str, Path]:
    """The project's default training on the synthetic default, once; (model URI, catalogue)."""
    from steps.train import train

    db = bench_store(workdir)
    saved = workdir / "model_uri.txt"
    if saved.is_file():
        return saved.read_text().strip(), db
    print(f"training the default model in {workdir} (later runs reuse it)", flush=True)
    started = time.monotonic()
    _, accuracy, model_uri = train(db)
    print(f"trained in {time.monotonic() - started:.0f} s, validation accuracy {accuracy:.4f}", flush=True)
    saved.write_text(model_uri)
    return model_uri, db


def fresh_synthetic(workdir: Path) -> list[Path]:
    """Synthetic images from another seed: never seen in training nor in calibration."""
    from steps.extract import extract

    folder = workdir / f"fresh-{FRESH_SEED}"
    if not (folder / "metadata.csv").is_file():
        extract("synthetic", folder / "images", folder / "metadata.csv", images_per_class=FRESH_PER_CLASS, seed=FRESH_SEED)
    return sorted((folder / "images").rglob("*.jpg"))


def answers(model, files: list[Path]):
    import pandas as pd

    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}), params={"k": 0})
    if out.error.notna().any():
        raise RuntimeError(f"unreadable images: {out.error.dropna().unique()[:3]}")
    return out


def auroc(familiar: np.ndarray, strange: np.ndarray) -> float:
    """P(a familiar image scores higher than a strange one), ties counting half."""
    from sklearn.metrics import roc_auc_score

    scores = np.concatenate([familiar, strange]).astype(float)
    return float(roc_auc_score(np.r_[np.ones(len(familiar)), np.zeros(len(strange))], scores))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real", type=Path, default=AFHQ_SAMPLE, help="a folder of real photos (searched recursively)")
    parser.add_argument("--model-uri", help="a model logged by this project's train (with familiarity)")
    parser.add_argument("--db", type=Path, help="with --model-uri: its catalogue (validation split)")
    args = parser.parse_args(argv)
    if not args.real.is_dir():
        print(f"bench.unfamiliar: skipped: no folder of real photos at {args.real} (give --real)")
        return 0
    real_files = sorted(f for f in args.real.rglob("*") if f.suffix.lower() in IMAGE_TYPES)
    if not real_files:
        print(f"bench.unfamiliar: skipped: no images under {args.real}")
        return 0
    if args.model_uri and not args.db:
        parser.error("--model-uri needs --db (the catalogue it was trained on)")

    import mlflow

    print(f"machine before: {machine()}", flush=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    model_uri, db = (args.model_uri, args.db) if args.model_uri else default_model(WORKDIR)
    model = mlflow.pyfunc.load_model(model_uri)
    val = catalogue_rows(db, split="val")
    groups = {
        "synthetic validation (calibration set)": answers(model, [Path(f) for f in val.file]),
        f"synthetic, fresh (seed {FRESH_SEED}, never seen)": answers(model, fresh_synthetic(WORKDIR)),
        f"real photos ({args.real.name})": answers(model, real_files),
    }
    real = groups[f"real photos ({args.real.name})"]
    truth = [f.parent.name for f in real_files]
    rows = [
        [name, len(out), f"{out.unfamiliar.astype(bool).mean():.1%}", f"{np.median(out.familiarity.astype(float)):.3f}"]
        for name, out in groups.items()
    ]
    table("Share flagged `unfamiliar` at the stored threshold", ["images", "n", "flagged", "median familiarity"], rows)
    synthetic_val, fresh = (groups[name].familiarity.to_numpy(float) for name in list(groups)[:2])
    real_scores = real.familiarity.to_numpy(float)
    flagged = float(real.unfamiliar.astype(bool).mean())
    area, area_fresh = auroc(synthetic_val, real_scores), auroc(fresh, real_scores)
    table(
        "Targets",
        ["measure", "target", "measured", ""],
        [
            ["AUROC of familiarity, synthetic validation vs real", "at least 0.95", f"{area:.3f}", "met" if area >= 0.95 else "missed"],
            ["AUROC of familiarity, fresh synthetic vs real", "(out of sample)", f"{area_fresh:.3f}", ""],
            ["real photos flagged", "at least 90%", f"{flagged:.1%}", "met" if flagged >= 0.9 else "missed"],
        ],
    )
    right = np.mean([label == t for label, t in zip(real.label, truth, strict=True)])
    print(
        f"\nThe same model's accuracy on the real photos (folder name = class): {right:.3f} "
        f"(validation accuracy on synthetic: {np.mean(groups[list(groups)[0]].label.to_numpy() == val.label.to_numpy()):.3f})"
    )
    print(f"model {model_uri}; machine after: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
