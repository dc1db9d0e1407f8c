"""train: catalogue -> decoded images -> Keras network -> one MLflow run with everything logged.

The story, top to bottom:
1. read the catalogue (not the folder): file paths, labels, splits, its content hash;
2. every image decoded once, in threads, with pyfunc.preprocess.load_image (the same function
   serving uses) into one array; a tf.data pipeline shuffles and augments the training split only;
3. the network: our CNN (conv blocks with BatchNorm, dropout, a named embedding layer) or a
   pretrained keras.applications backbone with the same head (trained on the frozen backbone, then
   optionally fine-tuned), Adam under a warm-up + cosine learning-rate schedule, early stopping;
4. log params, per-epoch metrics, training curves, confusion matrix, classification report, the
   catalogue as the dataset input, the model card's facts, and the model as the `animal` pyfunc
   with its recommender and its familiarity statistics (pyfunc/familiarity.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
import tensorflow as tf
from sklearn.metrics import classification_report, confusion_matrix

from databases import catalogue
from databases.image_store import read_location
from pyfunc.familiarity import MASS, Familiarity
from pyfunc.model import EMBEDDING_LAYER, log_animal_model, with_embedding
from pyfunc.preprocess import ImageError, load_image
from steps import backbones, defaults, features, imagenet_groups, model_card
from steps.defaults import Hyperparameters
from steps.progress import progress
from steps.tracking import start_run
from team.preflight import one_line_errors

# Known, harmless warnings that would bury the training log.
warnings.filterwarnings("ignore", message=".*dataset source can be interpreted in multiple ways")
warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
warnings.filterwarnings("ignore", message=".*`shuffle=True` was passed")

MODEL_TAG = "model_uri"  # run tag through which `main` and `tune` find the logged model
FEATURES_LAYER = "features"  # the globally averaged feature maps, input of the head
IMAGENET_LAYER = "imagenet"  # head=imagenet: ImageNet's own 1000-way softmax, kept frozen
ANIMAL_MASS_LAYER = "animal_mass"  # its mass on the cat, dog and wild classes: the unfamiliar signal
# head=imagenet: validation images flagged. Not 5%: on the 42 validation photos of the sample that
# flags 2, and the real photos' mass (0.53-0.98) is far from other things' (0.00-0.16), so the
# threshold can sit at the least mass seen on validation (docs/real-photos.md has the measurements).
MASS_FLAG_SHARE = 0.01
# head=imagenet: never flagged when ImageNet puts at least this share of its probability on the 149
# animal classes (one of our animals is then its answer over everything else together). Chosen
# for what it means, not fitted: the least mass of 42 validation photos (0.65) flagged 6.4% of
# 1,500 real AFHQ cats, this floor 2.4%; drawings and other things reach 0.45 at most
# (docs/real-photos.md).
MASS_MAJORITY = 0.5
FINE_TUNE_RATE = 0.1  # fine-tuning a pretrained backbone: this fraction of the learning rate
DECODE_CHUNK = 512  # images decoded per batch of thread-pool work


@dataclass
class Data:
    """The catalogue, split and ready to feed Keras."""

    labels: list[str]
    frame: pd.DataFrame  # all catalogue rows, with absolute paths in `file`
    train_images: tf.data.Dataset  # decoded once, held in memory, not shuffled
    val_images: tf.data.Dataset
    y_train: np.ndarray
    y_val: np.ndarray
    content_hash: str


def load_data(db_path: Path, image_size: int) -> Data:
    conn = catalogue.connect(db_path, readonly=True)
    try:
        frame, content_hash = catalogue.images(conn), catalogue.content_hash(conn)
    finally:
        conn.close()
    train_rows, val_rows = frame[frame.split == "train"], frame[frame.split == "val"]
    if train_rows.empty or val_rows.empty:
        raise ValueError(f"the catalogue {db_path} needs images in both splits (train: {len(train_rows)}, val: {len(val_rows)})")
    labels = sorted(train_rows.label.unique())
    index = {label: i for i, label in enumerate(labels)}
    return Data(
        labels=labels,
        frame=frame,
        train_images=decoded_images(train_rows.file.tolist(), image_size),
        val_images=decoded_images(val_rows.file.tolist(), image_size),
        y_train=train_rows.label.map(index).to_numpy(np.int32),
        y_val=val_rows.label.map(index).to_numpy(np.int32),
        content_hash=content_hash,
    )


def decoded_images(files: list[str], image_size: int) -> tf.data.Dataset:
    """Each file read and preprocessed once, in parallel, into one uint8 array held in memory."""
    return tf.data.Dataset.from_tensor_slices(decode_files(files, image_size))


def decode_files(files: list[str], image_size: int) -> np.ndarray:
    """(len(files), image_size, image_size, 3) uint8, by `load_image` (serving's own preprocessing).

    Threads, one per core: Pillow decodes and resizes without holding the GIL. One array rather than
    tf.data's element cache: with that cache the second epoch still began by re-reading it element by
    element into the shuffle buffer (1.2 s before its first batch at 1,200 images, 0.01 s from an
    array), longer than the epoch's training at AFHQ's size.
    """
    images = np.empty((len(files), image_size, image_size, 3), np.uint8)

    def read(file: str) -> np.ndarray:
        try:
            return load_image(read_location(file), image_size)  # a file, or an object in a bucket
        except (OSError, ImageError) as error:
            raise ImageError(f"{file}: {error}") from None

    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:

        def in_order() -> Iterator[np.ndarray]:  # a chunk at a time: results never pile up
            for start in range(0, len(files), DECODE_CHUNK):
                yield from pool.map(read, files[start : start + DECODE_CHUNK])

        for i, image in enumerate(progress(in_order(), len(files), f"decode at {image_size} px")):
            images[i] = image
    return images


class Augmentation:
    """Training-only augmentation: horizontal flip, rotation, zoom and translation, then contrast.

    The random draws are Keras's own layers' (RandomFlip, RandomRotation, RandomZoom,
    RandomTranslation, RandomContrast, with the ranges `strength` sets), but the four geometric ones
    are composed into one transform, so each batch is resampled once instead of three times (flip
    included): the same augmentation, a little sharper (each bilinear resampling blurs), for 0.64
    CPU-seconds per 1,200 images at 64 px instead of 1.57 as five layers; it shares the two cores
    with the network's own step (docs/performance.md).
    """

    def __init__(self, strength: float, seed: int):
        self.flip = keras.layers.RandomFlip("horizontal", seed=seed)
        self.rotation = keras.layers.RandomRotation(strength, seed=seed)
        self.zoom = keras.layers.RandomZoom(strength, seed=seed)
        self.translation = keras.layers.RandomTranslation(strength / 2, strength / 2, seed=seed)
        self.contrast = keras.layers.RandomContrast(min(strength * 2, 0.9), seed=seed)

    def __call__(self, images: tf.Tensor, training: bool = True) -> tf.Tensor:
        if not training:
            return images
        images = keras.ops.image.affine_transform(
            images, self.transform(images), interpolation="bilinear", fill_mode=self.rotation.fill_mode
        )
        return self.contrast(images, training=True)

    def transform(self, images: tf.Tensor) -> tf.Tensor:
        """One random (flip, rotation, zoom, translation) per image, composed: (batch, 8), as
        ImageProjectiveTransform takes it (the output pixel's source position in the input)."""
        return compose(*self.matrices(images))

    def matrices(self, images: tf.Tensor) -> list[tf.Tensor]:
        """The four layers' own random transforms, each as (batch, 3, 3), in the order they apply."""
        shape = tf.shape(images)
        height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
        ones, zeros = tf.ones([shape[0]]), tf.zeros([shape[0]])
        flips = tf.reshape(tf.cast(self.flip.get_random_transformation(images)["flips"], tf.float32), [-1])
        flip = [1 - 2 * flips, zeros, flips * (width - 1), zeros, ones, zeros, zeros, zeros]
        rotation = self.rotation.get_random_transformation(images)["rotation_matrix"]
        drawn = self.zoom.get_random_transformation(images)
        zx, zy = tf.reshape(drawn["width_zoom"], [-1]), tf.reshape(drawn["height_zoom"], [-1])
        # RandomZoom's own matrix: about the image centre.
        zoom = [zx, zeros, (width - 1) / 2 * (1 - zx), zeros, zy, (height - 1) / 2 * (1 - zy), zeros, zeros]
        shift = self.translation.get_random_transformation(images)["translations"]
        translation = [ones, zeros, -shift[:, 0], zeros, ones, -shift[:, 1], zeros, zeros]
        return [_square(tf.stack(flip, axis=1)), _square(rotation), _square(tf.stack(zoom, axis=1)), _square(tf.stack(translation, axis=1))]


def compose(*matrices: tf.Tensor) -> tf.Tensor:
    """Transforms applied one after the other, as one: each maps an output pixel to its source, so
    the first applied is the leftmost factor."""
    total = matrices[0]
    for matrix in matrices[1:]:
        total = tf.linalg.matmul(total, matrix)
    total = total / total[:, 2:3, 2:3]
    return tf.reshape(total, [-1, 9])[:, :8]


def _square(transform: tf.Tensor) -> tf.Tensor:
    """(batch, 8) projective transform -> (batch, 3, 3)."""
    transform = tf.cast(tf.reshape(transform, [-1, 8]), tf.float32)
    return tf.reshape(tf.concat([transform, tf.ones_like(transform[:, :1])], axis=1), [-1, 3, 3])


def pipelines(data: Data, hp: Hyperparameters, seed: int) -> tuple[tf.data.Dataset, tf.data.Dataset]:
    train = (
        tf.data.Dataset.zip(data.train_images, tf.data.Dataset.from_tensor_slices(data.y_train))
        .shuffle(len(data.y_train), seed=seed, reshuffle_each_iteration=True)
        .batch(hp.batch_size)
    )
    if hp.augment > 0:
        augment = Augmentation(hp.augment, seed)
        train = train.map(lambda x, y: (augment(tf.cast(x, tf.float32), training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    val = tf.data.Dataset.zip(data.val_images, tf.data.Dataset.from_tensor_slices(data.y_val)).batch(256)
    return train.prefetch(tf.data.AUTOTUNE), val.prefetch(tf.data.AUTOTUNE)


def build_model(hp: Hyperparameters, image_size: int, n_classes: int, labels: list[str] | None = None) -> keras.Model:
    """The network `hp.backbone` names (uncompiled: `fit` compiles it, with its schedule).
    `labels`: the classes in output order (head=imagenet maps ImageNet's classes onto them)."""
    if hp.backbone == backbones.CNN:
        return cnn(hp, image_size, n_classes)
    return pretrained(hp, image_size, labels or [str(i) for i in range(n_classes)])


def cnn(hp: Hyperparameters, image_size: int, n_classes: int) -> keras.Model:
    """Our network, trained from scratch: `conv_blocks` blocks named block1, block2, ..."""
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = keras.layers.Rescaling(1.0 / 255)(inputs)
    for block in range(hp.conv_blocks):
        x = keras.layers.Conv2D(hp.filters * 2**block, 3, padding="same", use_bias=False)(x)
        # Momentum 0.9, not 0.99: the moving statistics used at evaluation must settle within the
        # few hundred steps of a short CPU training, or validation sits at chance for epochs.
        x = keras.layers.BatchNormalization(momentum=0.9)(x)
        x = keras.layers.ReLU(name=f"block{block + 1}")(x)
        x = keras.layers.MaxPooling2D()(x)
    features = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x)
    return keras.Model(inputs, head(features, hp, n_classes), name="animal_cnn")


def pretrained(hp: Hyperparameters, image_size: int, labels: list[str]) -> keras.Model:
    """A keras.applications backbone (input scaling inside, pixels in 0..255 as for `cnn`) under
    `hp.head`. The backbone starts frozen: the head is trained first (fine_tune).

    head=imagenet: outputs (probabilities, animal_mass): ImageNet's classifier restricted to the
    classes of our groups, summed per group (the softmax over those classes summed per group is
    ImageNet's softmax summed per group and renormalised over the three); and beside it ImageNet's
    whole frozen classifier, whose mass on those classes serving reads as the familiarity signal."""
    backbone, classifier = backbones.load(hp.backbone, hp.weights, image_size, hp.head)
    backbone.trainable = False
    inputs = keras.Input(shape=(image_size, image_size, 3))
    x = inputs
    if backbones.BACKBONES[hp.backbone].scale_inputs:  # MobileNetV2 wants -1..1 (its preprocess_input)
        x = keras.layers.Rescaling(1 / 127.5, offset=-1, name="scale")(x)
    # training=False: its BatchNorm layers keep ImageNet's statistics, also once fine-tuned.
    pooled = keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(backbone(x, training=False))
    outputs = head(pooled, hp, labels, classifier)
    if hp.head == backbones.IMAGENET_HEAD:
        imagenet = keras.layers.Dense(imagenet_groups.IMAGENET_CLASSES, activation="softmax", trainable=False, name=IMAGENET_LAYER)
        mass = keras.layers.Dense(1, use_bias=False, trainable=False, name=ANIMAL_MASS_LAYER)
        outputs = [outputs, mass(imagenet(pooled))]
        imagenet.set_weights(classifier)
        mass.set_weights([imagenet_groups.group_matrix(labels).sum(axis=1, keepdims=True)])
    return keras.Model(inputs, outputs, name=f"animal_{hp.backbone}")


def head(features, hp: Hyperparameters, labels: list[str] | int, classifier: list[np.ndarray] | None = None):
    """The classification head on pooled features, for `labels` (or that many classes: head=new).
    `classifier`: ImageNet's [kernel, bias], the start of head=imagenet (None: its weights are set
    afterwards, as fit_head does)."""
    if hp.head == backbones.IMAGENET_HEAD:
        members = imagenet_groups.members(labels)
        # The pooled features themselves are the embedding: ImageNet's, what similar images compare.
        x = keras.layers.Identity(name=EMBEDDING_LAYER)(features)
        animals = keras.layers.Dense(len(members), activation="softmax", name="imagenet_animals")
        pool = keras.layers.Dense(len(labels), use_bias=False, trainable=False, name="probabilities")
        probabilities = pool(animals(x))
        pool.set_weights([imagenet_groups.group_matrix(labels)[members]])
        if classifier is not None:
            animals.set_weights([classifier[0][:, members], classifier[1][members]])
        return probabilities
    n_classes = labels if isinstance(labels, int) else len(labels)
    x = keras.layers.Dropout(hp.dropout)(features)
    x = keras.layers.Dense(hp.dense_units, activation="relu", name=EMBEDDING_LAYER)(x)
    x = keras.layers.Dropout(hp.dropout)(x)
    return keras.layers.Dense(n_classes, activation="softmax", name="probabilities")(x)


def familiarity_layers(model: keras.Model) -> list[str]:
    """Where familiarity is measured: every block of the CNN (the early ones see texture and
    colour statistics, where photos differ most from drawings), else the backbone's pooled features."""
    names = [layer.name for layer in model.layers]
    if ANIMAL_MASS_LAYER in names:
        return [ANIMAL_MASS_LAYER]
    blocks = [name for name in names if name.startswith("block") and name[5:].isdigit()]
    return blocks or [FEATURES_LAYER]


def compile_model(model: keras.Model, hp: Hyperparameters, steps_per_epoch: int, epochs: int) -> None:
    """Adam under a one-epoch linear warm-up to `learning_rate`, then a cosine decay to zero at the
    last planned epoch. Without the warm-up, the first large steps on freshly initialised weights
    leave BatchNorm's moving statistics behind and validation sat at chance for several epochs;
    without the decay, validation accuracy kept jumping from epoch to epoch at the end."""
    total = max(1, steps_per_epoch * epochs)
    warmup = min(steps_per_epoch, total // 2)
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=hp.learning_rate / 20, warmup_target=hp.learning_rate, warmup_steps=warmup, decay_steps=max(1, total - warmup)
    )
    model.compile(optimizer=keras.optimizers.Adam(schedule), loss="sparse_categorical_crossentropy", metrics=["accuracy"])


class MlflowMetrics(keras.callbacks.Callback):
    """Per-epoch metrics into the active MLflow run."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        mlflow.log_metrics({k: float(v) for k, v in (logs or {}).items()}, step=epoch)


def fit(
    model: keras.Model,
    data: Data,
    hp: Hyperparameters,
    epochs: int,
    patience: int,
    seed: int,
    callbacks: list | None = None,
    initial_epoch: int = 0,
) -> keras.callbacks.History:
    """Compile (the schedule spans `epochs`) and train, keeping the best epoch's weights.
    `initial_epoch`: for tuning (Hyperband), which continues a model trained for that many epochs."""
    train, val = pipelines(data, hp, seed)
    compile_model(model, hp, steps_per_epoch=-(-len(data.y_train) // hp.batch_size), epochs=epochs - initial_epoch)
    # patience 0: no early stopping, but the best epoch's weights are still the ones kept.
    stop = keras.callbacks.EarlyStopping("val_accuracy", patience=patience or epochs, restore_best_weights=True)
    return model.fit(
        train,
        validation_data=val,
        epochs=epochs,
        initial_epoch=initial_epoch,
        callbacks=[stop, *(callbacks or [])],
        verbose=1 if sys.stdout.isatty() else 2,
    )


def fine_tune(
    model: keras.Model,
    data: Data,
    hp: Hyperparameters,
    history: keras.callbacks.History,
    patience: int,
    seed: int,
    callbacks: list | None = None,
) -> keras.callbacks.History:
    """A pretrained backbone's second stage: after its head, the whole network for
    `hp.fine_tune_epochs` more epochs at a tenth of the learning rate. Returns both stages' history."""
    if hp.backbone == backbones.CNN or hp.fine_tune_epochs <= 0:
        return history
    history = history or keras.callbacks.History()
    history.history = getattr(history, "history", None) or {}
    backbone = next(layer for layer in model.layers if isinstance(layer, keras.Model))
    backbone.trainable = True
    for layer in backbone.layers:  # BatchNorm stays frozen: small batches would spoil its statistics
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    done = len(history.history.get("loss", [])) if history is not None else 0
    model = training_view(model)
    gentler = replace(hp, learning_rate=hp.learning_rate * FINE_TUNE_RATE)  # fit compiles with it
    tuned = fit(model, data, gentler, done + hp.fine_tune_epochs, patience, seed, callbacks, initial_epoch=done)
    both = keras.callbacks.History()
    both.history = {
        key: list(history.history.get(key, [])) + list(tuned.history.get(key, [])) for key in {*history.history, *tuned.history}
    }
    return both


def training_view(model: keras.Model) -> keras.Model:
    """The network as trained: its first output, the probabilities (head=imagenet's animal_mass is
    a frozen output for serving, with nothing to learn). The same layers, so training it trains `model`."""
    return model if len(model.outputs) == 1 else keras.Model(model.inputs, model.outputs[0])


def head_layers(model: keras.Model) -> list[str]:
    """The names of the layers after the pooled features that lead to the probabilities."""
    start = [layer.name for layer in model.layers].index(FEATURES_LAYER)
    return [layer.name for layer in model.layers[start + 1 :] if layer.name not in (IMAGENET_LAYER, ANIMAL_MASS_LAYER)]


def copy_weights(source: keras.Model, target: keras.Model, names: list[str]) -> None:
    for name in names:
        if source.get_layer(name).weights:
            target.get_layer(name).set_weights(source.get_layer(name).get_weights())


def fit_head(
    model: keras.Model,
    data: Data,
    hp: Hyperparameters,
    epochs: int,
    patience: int,
    seed: int,
    callbacks: list | None = None,
    initial_epoch: int = 0,
) -> keras.callbacks.History | None:
    """A pretrained backbone's first stage: its head alone, on the frozen backbone's pooled features,
    computed once per image and cached (steps/features.py), not on every batch of every epoch.
    No augmentation here: it would change the features. None when there is nothing to train."""
    if epochs <= initial_epoch:
        return None
    train_features, val_features = features.pooled_features(model, FEATURES_LAYER, (data.train_images, data.val_images))
    if mlflow.active_run() is not None:
        mlflow.log_metrics({f"feature_cache_{kind}": float(n) for kind, n in features.last_counts.items()})
    inputs = keras.Input(shape=(train_features.shape[1],))
    head_model = keras.Model(inputs, head(inputs, hp, data.labels), name="head")
    names = [name for name in head_layers(model) if model.get_layer(name).weights]
    copy_weights(model, head_model, names)
    on_features = replace(
        data,
        train_images=tf.data.Dataset.from_tensor_slices(train_features),
        val_images=tf.data.Dataset.from_tensor_slices(val_features),
    )
    wrapped = [OnNetwork(callback, model, head_model, names) for callback in callbacks or []]
    history = fit(head_model, on_features, replace(hp, augment=0.0), epochs, patience, seed, wrapped, initial_epoch)
    copy_weights(head_model, model, names)
    return history


class OnNetwork(keras.callbacks.Callback):
    """A callback of the head's fit, shown the whole network with the head's current weights:
    KerasTuner's checkpoints save, and later load, the whole network's weights, not the head's."""

    def __init__(self, inner: keras.callbacks.Callback, network: keras.Model, head_model: keras.Model, names: list[str]):
        super().__init__()
        self.inner, self.network, self.head_model, self.names = inner, network, head_model, names

    def set_model(self, model: keras.Model) -> None:
        self.inner.set_model(self.network)

    def set_params(self, params: dict) -> None:
        self.inner.set_params(params)

    def on_train_begin(self, logs: dict | None = None) -> None:
        self.inner.on_train_begin(logs)

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.inner.on_epoch_begin(epoch, logs)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        copy_weights(self.head_model, self.network, self.names)
        self.inner.on_epoch_end(epoch, logs)

    def on_train_end(self, logs: dict | None = None) -> None:
        self.inner.on_train_end(logs)


def train_network(
    model: keras.Model,
    data: Data,
    hp: Hyperparameters,
    epochs: int,
    patience: int,
    seed: int,
    callbacks: list | None = None,
    initial_epoch: int = 0,
) -> keras.callbacks.History | None:
    """The whole training: the CNN end to end; a pretrained backbone's head on cached features,
    then `fine_tune_epochs` of the whole network. None: nothing trained (epochs=0, head=imagenet)."""
    if hp.backbone == backbones.CNN:
        return fit(model, data, hp, epochs, patience, seed, callbacks, initial_epoch)
    history = fit_head(model, data, hp, epochs, patience, seed, callbacks, initial_epoch)
    return fine_tune(model, data, hp, history, patience, seed, callbacks)


def fit_familiarity(taps: list[str], train_taps: list[np.ndarray], y_train: np.ndarray, val_taps: list[np.ndarray]) -> Familiarity:
    """The unfamiliar signal: the animal mass where the network has it, else the Mahalanobis distance."""
    if taps == [ANIMAL_MASS_LAYER]:
        return Familiarity.fit_mass(val_taps[0], MASS_FLAG_SHARE, floor=1.0 - MASS_MAJORITY)
    unfitted = Familiarity(np.zeros((0, 0)), np.zeros((0, 0)), np.zeros(0))
    return Familiarity.fit(unfitted.features(train_taps), y_train, unfitted.features(val_taps))


def log_training(
    model: keras.Model, data: Data, history: keras.callbacks.History | None, image_size: int, hp: Hyperparameters | None = None
) -> tuple[float, str]:
    """Evaluate on validation, fit familiarity, log plots, report, the model card's facts and the
    pyfunc model; returns (val accuracy, model URI). `hp`: what trained it, for the model card."""
    taps = familiarity_layers(model)
    train_out, val_out = (forward(model, taps, images) for images in (data.train_images, data.val_images))
    probabilities = val_out[0]
    predicted = probabilities.argmax(axis=1)
    accuracy = float((predicted == data.y_val).mean())
    matrix = confusion_matrix(data.y_val, predicted, labels=range(len(data.labels)))
    familiarity = fit_familiarity(taps, train_out[2], data.y_train, val_out[2])
    per_class = {label: float(matrix[i, i] / max(matrix[i].sum(), 1)) for i, label in enumerate(data.labels)}
    flagged = float(familiarity.flagged(familiarity.distances(familiarity.features(val_out[2]))).mean())
    mlflow.log_metrics(
        {
            "final_val_accuracy": accuracy,
            **{f"val_accuracy_{k}": v for k, v in per_class.items()},
            "familiarity_threshold": familiarity.threshold,
            "val_unfamiliar_share": flagged,
        }
    )
    report = classification_report(
        data.y_val, predicted, labels=range(len(data.labels)), target_names=data.labels, digits=4, zero_division=0
    )
    mlflow.log_text(report, "classification_report.txt")
    mlflow.log_figure(confusion_figure(matrix, data.labels), "confusion_matrix.png")
    if history is not None and history.history:
        mlflow.log_figure(curves_figure(history.history), "training_curves.png")
    print(report)
    facts = model_card.training_facts(
        data.frame,
        data.labels,
        data.content_hash,
        image_size,
        accuracy,
        per_class,
        matrix.tolist(),
        familiarity.threshold,
        familiarity.flag_share,
        flagged,
        None if hp is None else asdict(hp),
        mlflow.active_run().info.run_id,
        method=model_card.MASS_METHOD if familiarity.signal == MASS else model_card.FAMILIARITY_METHOD,
    )
    mlflow.log_dict(facts, model_card.FACTS_FILE)
    mlflow.log_text(model_card.render(facts), model_card.CARD_FILE)

    with tempfile.TemporaryDirectory() as workdir:
        gallery = Path(workdir) / "gallery.db"
        write_gallery(data, np.concatenate([train_out[1], val_out[1]]), gallery)
        example = read_location(data.frame[data.frame.split == "val"].file.iloc[0])
        check = next(data.val_images.batch(256).as_numpy_iterator())  # the ONNX export is compared with Keras on these
        info = log_animal_model(model, data.labels, image_size, gallery, example, Path(workdir), familiarity, taps, check)
    mlflow.set_tag(MODEL_TAG, info.model_uri)
    return accuracy, info.model_uri


def forward(model: keras.Model, taps: list[str], images: tf.data.Dataset) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(probabilities, embeddings, the familiarity taps' outputs) of decoded images, as served."""
    probabilities, embeddings, *tapped = with_embedding(model, taps).predict(images.batch(256), verbose=0)
    return probabilities, embeddings, tapped


def write_gallery(data: Data, embeddings: np.ndarray, gallery: Path) -> None:
    """The recommender's gallery: every catalogue image (train, then val) with its embedding."""
    from pyfunc.recommender import write_gallery as write

    ordered = pd.concat([data.frame[data.frame.split == "train"], data.frame[data.frame.split == "val"]])
    write(gallery, ordered.id, ordered.path, ordered.label, embeddings, ordered.sha256)


def confusion_figure(matrix: np.ndarray, labels: list[str]) -> plt.Figure:
    figure, axes = plt.subplots(figsize=(4.5, 4))
    axes.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        axes.text(j, i, str(count), ha="center", va="center", color="white" if count > matrix.max() / 2 else "black")
    axes.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title="Validation confusion matrix",
    )
    figure.tight_layout()
    return figure


def curves_figure(history: dict[str, list[float]]) -> plt.Figure:
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric in zip(axes, ("loss", "accuracy")):
        for prefix in ("", "val_"):
            if prefix + metric in history:
                ax.plot(
                    range(1, len(history[prefix + metric]) + 1),
                    history[prefix + metric],
                    marker="o",
                    label=(prefix or "train_").rstrip("_"),
                )
        ax.set(xlabel="epoch", title=metric)
        ax.grid(alpha=0.3)
        ax.legend()
    figure.tight_layout()
    return figure


def _catalogue_source(db_path: Path | str):
    """A SQLite file is a path MLflow knows; a database URL is not a source type it resolves, so it
    goes in as a tag (without its password)."""
    if not catalogue.is_url(db_path):
        return str(Path(db_path).resolve())
    from mlflow.data.code_dataset_source import CodeDatasetSource

    return CodeDatasetSource({"catalogue": catalogue.describe(db_path)})


def log_catalogue(data: Data, db_path: Path) -> None:
    """The catalogue as the active run's dataset input (digest = its content hash), and as a tag."""
    mlflow.set_tag("catalogue_sha256", data.content_hash)
    dataset = mlflow.data.from_pandas(
        data.frame.drop(columns=["file"]),
        source=_catalogue_source(db_path),
        name="catalogue",
        targets="label",
        digest=data.content_hash[:32],
    )
    mlflow.log_input(dataset, context="training")


def train(
    db_path: Path,
    image_size: int = defaults.IMAGE_SIZE,
    epochs: int = defaults.EPOCHS,
    patience: int = defaults.PATIENCE,
    seed: int = defaults.SEED,
    hp: Hyperparameters | None = None,
) -> tuple[str, float, str]:
    """Train and log one model; returns (run id, validation accuracy, model URI)."""
    hp = hp or Hyperparameters()
    backbones.check(hp.backbone, hp.weights, hp.head)  # head=imagenet on the CNN, say, stops here
    if hp.backbone != backbones.CNN:  # a missing weights file stops us here, before any work
        backbones.weights_file(hp.backbone, hp.weights, hp.head)
    keras.utils.set_random_seed(seed)
    data = load_data(db_path, image_size)
    with start_run("train") as run:
        mlflow.log_params(
            {
                **asdict(hp),
                "image_size": image_size,
                "epochs": epochs,
                "patience": patience,
                "seed": seed,
                "db": catalogue.describe(db_path),
                "labels": json.dumps(data.labels),
                "train_images": len(data.y_train),
                "val_images": len(data.y_val),
            }
        )
        log_catalogue(data, db_path)
        model = build_model(hp, image_size, len(data.labels), data.labels)
        history = train_network(model, data, hp, epochs, patience, seed, callbacks=[MlflowMetrics()])
        accuracy, model_uri = log_training(model, data, history, image_size, hp)
    return run.info.run_id, accuracy, model_uri


def add_hyperparameter_flags(parser: argparse.ArgumentParser) -> None:
    """--conv-blocks, --filters, ...: one flag per Hyperparameters field, its default the field's."""
    choices = {"backbone": backbones.CHOICES, "head": backbones.HEADS}
    for name, value in asdict(Hyperparameters()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value, choices=choices.get(name))


def hyperparameters_from(args: argparse.Namespace) -> Hyperparameters:
    return Hyperparameters(**{name: getattr(args, name) for name in asdict(Hyperparameters())})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=catalogue.location, default=defaults.CATALOGUE)
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--epochs", type=int, default=defaults.EPOCHS)
    parser.add_argument("--patience", type=int, default=defaults.PATIENCE, help="early stopping, in epochs; 0: off")
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    add_hyperparameter_flags(parser)
    return parser


@one_line_errors("train")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    hp = hyperparameters_from(args)
    try:
        run_id, accuracy, model_uri = train(args.db, args.image_size, args.epochs, args.patience, args.seed, hp)
    except (FileNotFoundError, ValueError, LookupError) as error:
        print(f"train: error: {error}", file=sys.stderr)
        return 2
    print(f"train: run {run_id}: validation accuracy {accuracy:.4f}, model {model_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
