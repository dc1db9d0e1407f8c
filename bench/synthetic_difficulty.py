"""How hard is the synthetic data set? Measures the yardsticks from DESIGN.md.

* logistic regression on raw 64x64 pixels must stay well under 80%;
* one epoch of the default CNN (steps.train) must not reach 100%;
* full training of that CNN must reach 97% or more.

Run: ``.venv/bin/python -m bench.synthetic_difficulty [--per-class 600 --test-per-class 150]``.
Prints a table of measured numbers; asserts nothing (see DESIGN.md, bench/).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from PIL import Image

from steps import defaults
from steps.synthetic import LABELS, draw_face

SIDE = defaults.IMAGE_SIZE  # the network's input size


def make_split(split: int, per_class: int, base_seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str], float]:
    """Images (N, 64, 64, 3) uint8, labels (N,), sub-types, and ms spent per generated image."""
    xs, ys, subs = [], [], []
    spent = 0.0
    for li, label in enumerate(LABELS):
        for i in range(per_class):
            t = time.perf_counter()
            img, attrs = draw_face(label, [base_seed, split, li, i])
            spent += time.perf_counter() - t
            # Same conversion the pipeline uses for every image.
            xs.append(np.asarray(img.convert("RGB").resize((SIDE, SIDE), Image.BILINEAR)))
            ys.append(li)
            subs.append(attrs["subtype"])
    return np.stack(xs), np.array(ys), subs, 1000 * spent / len(xs)


def logistic_accuracy(x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=300))
    clf.fit(x_tr.reshape(len(x_tr), -1).astype(np.float32), y_tr)
    return float(clf.score(x_te.reshape(len(x_te), -1).astype(np.float32), y_te))


def cnn_curve(
    x_tr: np.ndarray, y_tr: np.ndarray, x_te: np.ndarray, y_te: np.ndarray, epochs: int, seed: int
) -> tuple[dict[str, list[float]], np.ndarray, float]:
    """The project's default model and augmentation (steps.train), trained on these arrays:
    accuracy curves, final validation predictions, training seconds."""
    import keras
    import tensorflow as tf

    from steps.train import Augmentation, Hyperparameters, build_model, compile_model

    keras.utils.set_random_seed(seed)
    hp = Hyperparameters()
    model = build_model(hp, SIDE, len(LABELS))
    compile_model(model, hp, steps_per_epoch=-(-len(x_tr) // hp.batch_size), epochs=epochs)
    augment = Augmentation(hp.augment, seed)
    train = (
        tf.data.Dataset.from_tensor_slices((x_tr, y_tr))
        .shuffle(len(x_tr), seed=seed)
        .batch(hp.batch_size)
        .map(lambda x, y: (augment(tf.cast(x, tf.float32), training=True), y))
    )
    stop = keras.callbacks.EarlyStopping(monitor="val_accuracy", patience=4, restore_best_weights=True)
    t = time.perf_counter()
    hist = model.fit(train, validation_data=(x_te, y_te), epochs=epochs, callbacks=[stop], verbose=0)
    secs = time.perf_counter() - t
    pred = model.predict(x_te, batch_size=256, verbose=0).argmax(axis=1)
    return {k: [float(a) for a in v] for k, v in hist.history.items()}, pred, secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=defaults.IMAGES_PER_CLASS, help="training images per class")
    ap.add_argument("--test-per-class", type=int, default=150, help="test images per class")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0, help="Keras seed for the CNN")
    ap.add_argument("--no-cnn", action="store_true", help="only the pixel baseline")
    args = ap.parse_args()

    x_tr, y_tr, _, ms_tr = make_split(0, args.per_class)
    x_te, y_te, sub_te, ms_te = make_split(1, args.test_per_class)
    ms = (ms_tr * len(x_tr) + ms_te * len(x_te)) / (len(x_tr) + len(x_te))

    t = time.perf_counter()
    lr_acc = logistic_accuracy(x_tr, y_tr, x_te, y_te)
    rows = [
        ("ms per generated image (128x128)", f"{ms:.2f}"),
        ("logistic regression, raw 64x64 pixels", f"{lr_acc:.3f}  ({time.perf_counter() - t:.0f} s)"),
    ]
    if not args.no_cnn:
        curves, pred, secs = cnn_curve(x_tr, y_tr, x_te, y_te, args.epochs, args.seed)
        val = curves["val_accuracy"]
        rows += [
            ("CNN val accuracy after 1 epoch", f"{val[0]:.3f}"),
            ("CNN best val accuracy", f"{max(val):.3f}  (epoch {int(np.argmax(val)) + 1} of {len(val)})"),
            ("CNN training time", f"{secs:.0f} s ({secs / len(val):.1f} s/epoch)"),
            ("CNN train accuracy per epoch", " ".join(f"{a:.2f}" for a in curves["accuracy"])),
            ("CNN val accuracy per epoch", " ".join(f"{a:.2f}" for a in val)),
        ]
        # Where the errors are: accuracy of the restored best model per generator sub-type.
        subs = np.array(sub_te)
        for sub in sorted(set(sub_te)):
            m = subs == sub
            rows.append((f"  best model on {sub}", f"{(pred[m] == y_te[m]).mean():.3f}  (n={m.sum()})"))

    print(f"synthetic difficulty: train {args.per_class}/class, test {args.test_per_class}/class, {SIDE}x{SIDE}")
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")


if __name__ == "__main__":
    main()
