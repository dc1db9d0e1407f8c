"""The real-photo model against the default one, on real photos, photos of other things and drawings.

    python -m bench.real_photos [--weights FILE] [--cats-every N] [--epochs N]
    python -m bench.real_photos --calibration-only

One table, rows: the default synthetic CNN (bench.unfamiliar's, trained once the project's default
way), MobileNetV2 with head=imagenet and epochs=0 (ImageNet's classifier pooled over cat/dog/wild,
no training), and the same trained on the sample's 15 training photos (head epochs on the cached
features). Columns: accuracy on the sample's 42 validation photos and on all 57, cat recall on the
real AFHQ cats (every Nth), the share flagged `unfamiliar` among the 57 real photos, among the photos
of other things and among the synthetic validation drawings, and ms per image (pyfunc predict on the
57, a batch, decoding included). All through the served pyfunc. A second table compares the two
candidate `unfamiliar` signals on the untrained model, and a third the ways of calibrating its
animal-mass threshold, each applied to the same masses: share flagged among the 1,500 AFHQ cats,
the 57 sample photos, the photos of other things and the drawings (--calibration-only: that table
alone, without the default CNN).

Needs the shared ImageNet weights and photos (ROOT.parent / "shared"); skips without them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.common import AFHQ_SAMPLE, RESULTS, SHARED, catalogue_rows, machine, table
from bench.unfamiliar import bench_store, default_model

WEIGHTS = SHARED / "weights" / "mobilenet_v2_1.0_224_imagenet.weights.h5"
CATS = SHARED / "data" / "afhq-cats"
OTHERS = SHARED / "data" / "not-animal-faces"
WORKDIR = RESULTS / "real_photos"
IMAGE_TYPES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
LABELS = ["cat", "dog", "wild"]


def images_under(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_TYPES)


def sample_catalogue(workdir: Path) -> Path:
    """The 57-photo AFHQ sample (15 train, 42 val) extracted and catalogued once."""
    from steps.extract import extract
    from steps.populate import populate

    db = workdir / "sample.db"
    if not db.is_file():
        extract(str(AFHQ_SAMPLE), workdir / "images", workdir / "metadata.csv")
        populate(workdir / "metadata.csv", workdir / "images", db)
    return db


def pretrained_model(db: Path, weights: Path, epochs: int, workdir: Path, image_size: int = 224) -> str:
    """head=imagenet at `image_size` px (the weights are 224 px ones; Keras builds the same network at
    any size), trained for `epochs` head epochs (0: as built); reused by settings."""
    from steps.defaults import Hyperparameters
    from steps.train import train

    saved = workdir / "models.json"
    known = json.loads(saved.read_text()) if saved.is_file() else {}
    key = f"{weights}|{epochs}" + ("" if image_size == 224 else f"|{image_size}px")  # 224: the keys made before sizes
    if key not in known:
        hp = Hyperparameters(backbone="mobilenet_v2", weights=str(weights), head="imagenet")
        started = time.monotonic()
        _, accuracy, known[key] = train(db, image_size=image_size, epochs=epochs, hp=hp)
        print(
            f"trained epochs={epochs} at {image_size} px in {time.monotonic() - started:.0f} s, validation accuracy {accuracy:.4f}",
            flush=True,
        )
        saved.write_text(json.dumps(known, indent=2))
    return known[key]


def answers(model, files: list[Path]) -> pd.DataFrame:
    out = model.predict(pd.DataFrame({"image": [f.read_bytes() for f in files]}), params={"k": 0})
    if out.error.notna().any():
        raise RuntimeError(f"unreadable images: {out.error.dropna().unique()[:3]}")
    return out


def row(name: str, model, sample: list[Path], cats: list[Path], others: list[Path], drawings: list[Path]) -> list[object]:
    truth = np.array([f.parent.name for f in sample])
    val = np.array([f.parent.parent.name == "val" for f in sample])
    started = time.perf_counter()
    real = answers(model, sample)
    ms = (time.perf_counter() - started) * 1000 / len(sample)
    right = real.label.to_numpy() == truth
    cat = answers(model, cats)
    flagged = [float(answers(model, files).unfamiliar.astype(bool).mean()) for files in (others, drawings)]
    return [
        name,
        f"{right[val].mean():.3f} ({right[val].sum()}/{val.sum()})",
        f"{right.mean():.3f} ({right.sum()}/{len(right)})",
        f"{(cat.label == 'cat').mean():.3f} ({(cat.label == 'cat').sum()}/{len(cat)})",
        f"{real.unfamiliar.astype(bool).mean():.1%}",
        f"{flagged[0]:.0%} ({round(flagged[0] * len(others))}/{len(others)})",
        f"{flagged[1]:.1%}",
        f"{ms:.1f}",
    ]


def signals(model_uri: str, db: Path, sample: list[Path], others: list[Path], drawings: list[Path]) -> list[list[object]]:
    """Both candidate signals on the untrained model: the animal mass (as stored) and the Mahalanobis
    distance on the pooled features, fitted on the 15 training photos, calibrated on the 42 (5%)."""
    import keras
    import mlflow

    from pyfunc.familiarity import Familiarity
    from pyfunc.model import with_embedding
    from pyfunc.preprocess import load_image
    from steps.train import ANIMAL_MASS_LAYER, FEATURES_LAYER

    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(WORKDIR / "signals")))
    network = with_embedding(
        keras.models.load_model(local / "artifacts" / "classifier.keras", compile=False), [ANIMAL_MASS_LAYER, FEATURES_LAYER]
    )

    def taps(files: list[Path]) -> tuple[np.ndarray, np.ndarray]:
        images = np.stack([load_image(f.read_bytes(), 224) for f in files])
        outs = [network(images[i : i + 32], training=False) for i in range(0, len(images), 32)]
        return np.concatenate([np.asarray(o[2]) for o in outs])[:, 0], np.concatenate([np.asarray(o[3]) for o in outs])

    rows = catalogue_rows(db)
    groups = {name: taps(files) for name, files in (("real", sample), ("others", others), ("drawings", drawings))}
    train_rows, val_rows = rows[rows.split == "train"], rows[rows.split == "val"]
    train_mass, train_features = taps([Path(f) for f in train_rows.file])
    val_mass, val_features = taps([Path(f) for f in val_rows.file])
    mahalanobis = Familiarity.fit(
        Familiarity(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0)).features([train_features]),
        train_rows.label.map({label: i for i, label in enumerate(LABELS)}).to_numpy(),
        Familiarity(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0)).features([val_features]),
    )
    mass = Familiarity.load(local / "artifacts" / "familiarity.npz")
    table_rows = []
    for name, signal, index in (
        ("animal mass (stored: 1% of validation, never at mass 0.5 or more)", mass, 0),
        ("Mahalanobis, 15 training photos (5%)", mahalanobis, 1),
    ):
        shares = [
            float(signal.flagged(signal.distances(signal.features([groups[g][index]]))).mean()) for g in ("real", "others", "drawings")
        ]
        table_rows.append([name, *(f"{s:.1%}" for s in shares)])
    ranges = [f"{groups[g][0].min():.2f}-{groups[g][0].max():.2f}" for g in ("real", "others", "drawings")]
    table_rows.append(["(animal mass, min-max)", *ranges])
    return table_rows


def calibrations(model_uri: str, db: Path, groups: dict[str, list[Path]]) -> list[list[object]]:
    """Ways of choosing the animal-mass threshold (flag: mass below it), from the sample's catalogue
    alone, each with the share it flags in every group (the same masses for all: the served model's
    own `animal_mass` output, through its pyfunc's forward pass)."""
    import mlflow

    from pyfunc.preprocess import load_image
    from steps.train import MASS_MAJORITY

    network = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()

    def masses(files: list[Path]) -> np.ndarray:
        out = []
        for start in range(0, len(files), network.batch):  # the pyfunc's own bound on a forward pass
            batch = np.stack([load_image(f.read_bytes(), network.image_size) for f in files[start : start + network.batch]])
            out.append(np.asarray(network._forward(batch)[2]).reshape(-1))  # outputs: probabilities, embedding, animal_mass
        return np.concatenate(out)

    rows = catalogue_rows(db)
    val = masses([Path(f) for f in rows[rows.split == "val"].file])
    both = np.concatenate([val, masses([Path(f) for f in rows[rows.split == "train"].file])])
    measured = {name: masses(files) for name, files in groups.items()}
    ways = [
        (f"least mass of the {len(val)} validation photos", float(val.min())),
        (f"least mass of train + validation ({len(both)})", float(both.min())),
        (f"5% quantile of validation ({len(val)})", float(np.quantile(val, 0.05))),
        (f"least of validation, never above {MASS_MAJORITY} (as stored)", min(float(val.min()), MASS_MAJORITY)),
    ]
    table_rows = [[name, f"{threshold:.3f}", *(f"{(measured[g] < threshold).mean():.1%}" for g in groups)] for name, threshold in ways]
    table_rows.append(["(animal mass, min-max)", "", *(f"{m.min():.2f}-{m.max():.2f}" for m in measured.values())])
    return table_rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", type=Path, default=WEIGHTS, help="MobileNetV2 weights with ImageNet's top")
    parser.add_argument("--cats-every", type=int, default=1, help="cat recall on every Nth of the AFHQ cats")
    parser.add_argument("--epochs", type=int, default=5, help="head epochs of the trained row")
    parser.add_argument("--calibration-only", action="store_true", help="only the table of animal-mass thresholds")
    args = parser.parse_args(argv)
    missing = [p for p in (args.weights, AFHQ_SAMPLE, CATS, OTHERS) if not p.exists()]
    if missing:
        print(f"bench.real_photos: skipped: not here: {', '.join(map(str, missing))}")
        return 0

    import mlflow

    print(f"machine before: {machine()}", flush=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    # Sets the tracking store of the default CNN's (its synthetic catalogue too), reused here.
    cnn_uri, synthetic_db = (None, bench_store(RESULTS / "unfamiliar")) if args.calibration_only else default_model(RESULTS / "unfamiliar")
    db = sample_catalogue(WORKDIR)
    sample, others = images_under(AFHQ_SAMPLE), images_under(OTHERS)
    cats = images_under(CATS)[:: args.cats_every]
    drawings = [Path(f) for f in catalogue_rows(synthetic_db, split="val").file]
    untrained = pretrained_model(db, args.weights, 0, WORKDIR)
    groups = {f"AFHQ cats ({len(cats):,})": cats, f"real sample ({len(sample)})": sample, f"other things ({len(others)})": others}
    groups[f"drawings ({len(drawings)})"] = drawings
    calibration_table = (
        "Calibrating the animal-mass threshold of the untrained model: share flagged",
        ["threshold from the sample's catalogue", "mass threshold", *groups],
        calibrations(untrained, db, groups),
    )
    if args.calibration_only:
        table(*calibration_table)
        print(f"machine after: {machine()}")
        return 0
    trained = pretrained_model(db, args.weights, args.epochs, WORKDIR)
    rows = [
        row(name, mlflow.pyfunc.load_model(uri), sample, cats, others, drawings)
        for name, uri in (
            ("default synthetic CNN (64 px)", cnn_uri),
            ("MobileNetV2 head=imagenet, epochs=0 (224 px)", untrained),
            (f"MobileNetV2 head=imagenet, {args.epochs} head epochs on the 15 training photos (224 px)", trained),
        )
    ]
    table(
        "Real photos",
        [
            "model",
            "accuracy, 42 val photos",
            "accuracy, all 57",
            f"cat recall, AFHQ cats (every {args.cats_every})",
            "real flagged",
            "other things flagged",
            f"drawings flagged ({len(drawings)})",
            "ms/image",
        ],
        rows,
    )
    table(
        "`unfamiliar` signals on the untrained model, share flagged",
        ["signal", f"real sample ({len(sample)})", f"other things ({len(others)})", f"drawings ({len(drawings)})"],
        signals(untrained, db, sample, others, drawings),
    )
    table(*calibration_table)
    print(f"machine after: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
