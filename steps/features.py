"""A frozen backbone's pooled features, computed once per image and kept by content hash.

Training a head on a frozen backbone runs the backbone's forward pass, by far the larger part of
the work, on every batch of every epoch (keras-io's transfer-learning guide does). Its output for an
image does not change while it is frozen, so it is computed once, stored as one small .npy file per
image under a folder named after the network's weights, and every later epoch, run and `tune` trial
reads it back (bench/frozen_head.py measures both ways).

The cache is derived data: git-ignored, safe to delete (defaults.FEATURE_CACHE, or the folder in
$ANIMAL_FEATURE_CACHE). Keys are sha256 digests: of the decoded image array (so the image size and
the preprocessing are in it) and of everything in the network up to the features layer (its
weights and their shapes, the input size), so a changed backbone never reads another's features.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from steps import defaults
from steps.progress import progress

BATCH = 64  # images per forward pass of the backbone, and per progress step

# Hits and misses of the last pooled_features call (train logs them: a re-run should be all hits).
last_counts: dict[str, int] = {"hits": 0, "misses": 0}


def cache_root() -> Path:
    return Path(os.environ.get("ANIMAL_FEATURE_CACHE") or defaults.FEATURE_CACHE)


def network_key(extractor) -> str:
    """sha256 of the feature extractor: its input shape, then each weight's shape and bytes."""
    digest = hashlib.sha256(repr(tuple(extractor.input_shape)).encode())
    for weight in extractor.weights:
        value = np.ascontiguousarray(np.asarray(weight))
        digest.update(repr(value.shape).encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def image_key(image: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()


def cached(extractor, images: np.ndarray, folder: Path) -> tuple[np.ndarray, int]:
    """(the features of `images`, how many were read from the cache); the rest computed and stored."""
    keys = [image_key(image) for image in images]
    paths = [folder / key[:2] / f"{key}.npy" for key in keys]
    found = {i: np.load(path) for i, path in enumerate(paths) if path.is_file()}
    missing = [i for i in range(len(images)) if i not in found]
    for start in progress(range(0, len(missing), BATCH), -(-len(missing) // BATCH), "backbone features", unit="batch"):
        chunk = missing[start : start + BATCH]
        # predict, not an eager call: one traced graph (eagerly, 42 images at 224 px took 16 s, not 1).
        for i, vector in zip(chunk, extractor.predict(images[chunk], batch_size=BATCH, verbose=0)):
            paths[i].parent.mkdir(parents=True, exist_ok=True)
            partial = paths[i].with_name(f"{paths[i].name}.{os.getpid()}.partial")  # tune's workers may race
            with partial.open("wb") as handle:
                np.save(handle, vector.astype(np.float32))
            partial.replace(paths[i])
            found[i] = vector.astype(np.float32)
    return np.stack([found[i] for i in range(len(images))]), len(images) - len(missing)


def pooled_features(model, layer: str, datasets) -> list[np.ndarray]:
    """The output of `layer` (the pooled features) for each tf.data dataset of decoded images."""
    import keras

    extractor = keras.Model(model.inputs, model.get_layer(layer).output)
    folder = cache_root() / network_key(extractor)
    out, last_counts["hits"], last_counts["misses"] = [], 0, 0
    for dataset in datasets:
        images = np.concatenate(list(dataset.batch(1024).as_numpy_iterator()))  # load_data: never empty
        vectors, hits = cached(extractor, images, folder)
        last_counts["hits"] += hits
        last_counts["misses"] += len(images) - hits
        out.append(vectors)
    return out
