"""A head on a frozen backbone: on cached features (ours) against the backbone on every batch.

    python -m bench.frozen_head [--weights FILE] [--epochs N] [--image-size PX]

keras-io's transfer-learning guide trains the head of a frozen backbone with `model.fit` on the
images: the backbone's forward pass runs again on every batch of every epoch. steps/train.py's
fit_head computes the pooled features once per image (steps/features.py, cached by content hash)
and fits the head on them. Both on the AFHQ sample's catalogue (15 training, 42 validation photos),
MobileNetV2 head=imagenet, the same Keras fit (validation included in each epoch). Reported: the
median seconds per epoch after the first (which traces), their ratio, and the first pass over the
images (cache empty), then a second one (all hits).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np

from bench.common import AFHQ_SAMPLE, RESULTS, machine, table
from bench.real_photos import WEIGHTS, WORKDIR, sample_catalogue


def epoch_times(fit) -> list[float]:
    """Seconds of each epoch of `fit(callbacks)`."""
    import keras

    times: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.started = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            times.append(time.perf_counter() - self.started)

    fit([Clock()])
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default=str(WEIGHTS))
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args(argv)
    if not AFHQ_SAMPLE.is_dir() or (args.weights not in ("imagenet", "none") and not os.path.isfile(args.weights)):
        print(f"bench.frozen_head: skipped: no AFHQ sample at {AFHQ_SAMPLE} or no weights file {args.weights}")
        return 0

    from steps import features, train
    from steps.defaults import Hyperparameters

    print(f"machine before: {machine()}", flush=True)
    WORKDIR.mkdir(parents=True, exist_ok=True)
    cache = RESULTS / "frozen_head" / "features"
    shutil.rmtree(cache, ignore_errors=True)
    os.environ["ANIMAL_FEATURE_CACHE"] = str(cache)
    data = train.load_data(sample_catalogue(WORKDIR), args.image_size)
    hp = Hyperparameters(backbone="mobilenet_v2", weights=args.weights, head="imagenet", augment=0.0)
    model = train.build_model(hp, args.image_size, len(data.labels), data.labels)
    images = len(data.y_train) + len(data.y_val)

    started = time.perf_counter()
    features.pooled_features(model, train.FEATURES_LAYER, (data.train_images, data.val_images))
    first_pass = time.perf_counter() - started
    started = time.perf_counter()
    features.pooled_features(model, train.FEATURES_LAYER, (data.train_images, data.val_images))
    second_pass = time.perf_counter() - started
    if features.last_counts["misses"]:
        raise RuntimeError(f"the second pass missed the cache: {features.last_counts}")

    ours = epoch_times(lambda callbacks: train.fit_head(model, data, hp, args.epochs, args.epochs, 0, callbacks))
    keras_io = epoch_times(lambda callbacks: train.fit(train.training_view(model), data, hp, args.epochs, args.epochs, 0, callbacks))
    per_epoch = {name: float(np.median(times[1:] or times)) for name, times in (("ours", ours), ("keras-io", keras_io))}
    table(
        f"Head epochs on a frozen MobileNetV2, {images} images ({len(data.y_train)} train + {len(data.y_val)} val), {args.image_size} px",
        ["way", "s per epoch (median after the first)", "first epoch s", "speed-up"],
        [
            ["backbone on every batch (keras-io)", f"{per_epoch['keras-io']:.3f}", f"{keras_io[0]:.2f}", "1x"],
            ["cached features (ours)", f"{per_epoch['ours']:.4f}", f"{ours[0]:.2f}", f"{per_epoch['keras-io'] / per_epoch['ours']:.0f}x"],
        ],
    )
    table(
        "The features' cost",
        ["pass", "seconds", "ms per image"],
        [
            ["first (cache empty: the backbone on every image)", f"{first_pass:.2f}", f"{first_pass * 1000 / images:.1f}"],
            ["second (all read from the cache)", f"{second_pass:.3f}", f"{second_pass * 1000 / images:.2f}"],
        ],
    )
    print(f"machine after: {machine()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
