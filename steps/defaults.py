"""Every default of the pipeline, defined once.

The command-line flags of every step, the MLproject's parameters (tests/test_defaults.py fails on
any difference), tune's search space and the benchmarks all read their defaults from here, so
`make run`, `mlflow run . -e train`, `python -m steps.train` and the benchmarks train one network.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

# Where things live: the one-person layout, files in the working folder (all git-ignored).
DATA_DIR = Path("data")
IMAGE_STORE = DATA_DIR / "images"
METADATA = DATA_DIR / "metadata.csv"
CATALOGUE = Path("databases/animal.db")
TRACKING_URI = "sqlite:///mlflow.db"  # the registry needs a database store
MAIN_IMAGE_STORE = ""  # main's image store: empty for DATA_DIR's images/ (or the --data-dir given)
EXPERIMENT = "animal-faces"

# extract
SOURCE = "synthetic"
IMAGES_PER_CLASS = 600  # synthetic only: train + val, per class
VAL_FRACTION = 0.2  # synthetic only
SEED = 42
# synthetic only: pixels per side of the files. 128 is the generator's own size; 512 rehearses AFHQ
# (its photos' size, JPEG quality and file size: `-P images_per_class=5000 -P synthetic_size=512`).
SYNTHETIC_SIZE = 128

# train
IMAGE_SIZE = 64  # the network's input, in pixels per side
EPOCHS = 20  # the learning-rate schedule spans them (with early stopping on, a run may end sooner)
# Early stopping, in epochs without a better validation accuracy; 0: off, the schedule decides the
# length. Mid-schedule, at the peak learning rate, validation accuracy still swings from epoch to
# epoch (0.49 -> 0.94 -> 0.49 in one run): a patience of 4 stopped that run at 0.947, before the
# decay that settles it. The best epoch's weights are kept either way.
PATIENCE = 0


@dataclass(frozen=True)
class Hyperparameters:
    """The network and its training. Defaults from the tuner's best region on the synthetic data
    (docs/tuning.md): five blocks see the whole 64 px face (ear shape and muzzle together decide
    the class); narrow ones keep an epoch short on two CPU cores."""

    conv_blocks: int = 5
    filters: int = 16  # of the first block; each block doubles it
    dense_units: int = 256  # size of the embedding used for "similar images"
    dropout: float = 0.1
    learning_rate: float = 2e-3  # the peak of the warm-up + cosine schedule
    augment: float = 0.05  # strength of rotation, zoom, translation and contrast
    batch_size: int = 32
    # The network: `cnn` (the one above, trained from scratch) or a keras.applications backbone,
    # mobilenet_v3_small or efficientnet_b0 (steps/backbones.py), whose conv_blocks and filters
    # it replaces. For those only: `weights` (imagenet, a weights file, or none) and the epochs of
    # fine-tuning the whole network after its head was trained on the frozen backbone.
    backbone: str = "cnn"
    weights: str = "imagenet"
    fine_tune_epochs: int = 0
    # mobilenet_v2 only: `new` (the head above, freshly initialised) or `imagenet` (ImageNet's own
    # classifier pooled over the cat, dog and wild classes: right on real photos before any
    # training; it needs weights with ImageNet's top; dense_units and dropout do not apply).
    head: str = "new"


# tune
TUNER = "bayesian"
MAX_TRIALS = 6
TUNE_EPOCHS = 12  # per trial (Hyperband: the most per trial)
TUNE_PATIENCE = 0  # early stopping within a trial; 0: off
TUNING_DIR = Path("outputs/tuning")

# A frozen backbone's pooled features, per image content hash (steps/features.py): derived data,
# git-ignored, safe to delete. ANIMAL_FEATURE_CACHE overrides the folder.
FEATURE_CACHE = Path("outputs/features")

# registry
MODEL_NAME = "animal"
ALIAS = "production"
STAGE = "Production"

# score (batch scoring of a photo collection)
SCORE_MODEL_URI = f"models:/{MODEL_NAME}@{ALIAS}"
SCORE_ENGINE = "local"  # or "spark"
SPARK_MASTER = "local[*]"  # the spark engine's default: every core of this machine
SCORE_BATCH_SIZE = 256  # images per model call: bounds memory, and what a kill can lose

# team layout (`make team-up`, docs/team.md): PostgreSQL and the tracking server on this machine
TEAM_DIR = Path(".team")  # the cluster's data, the artifacts folder, logs (git-ignored)
TEAM_HOST = "127.0.0.1"  # 0.0.0.0 lets other machines in
TEAM_POSTGRES_PORT = 5433  # not 5432: never collide with a system PostgreSQL
TEAM_TRACKING_PORT = 5000
TEAM_WORKERS = 2  # tracking-server worker processes


def boolean(text: str) -> bool:
    """argparse type of a yes/no flag: MLproject hands parameters over as strings ("true", "false").
    Anything else is an error, so that a typo (force=ture) is not quietly taken for false."""
    value = text.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
