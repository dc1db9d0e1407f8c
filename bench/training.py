"""Training: input-pipeline and per-epoch speed, ours vs the Keras-tutorial way, same images and model.

* ours: `train.load_data` (each catalogue image decoded once by `load_image`, then cached in
  memory) + `train.pipelines` (shuffle, batch, augment, prefetch) + `train.build_model`;
* tutorial: `keras.utils.image_dataset_from_directory` over the same image folder, which reads and
  decodes every file anew each epoch, with the same augmentation map and prefetch as the Keras
  "image classification from scratch" example, and the same `build_model`.

Each way runs in its own Python processes (one for the input phases, one for fit), so that its
peak memory (ru_maxrss) is its own and nothing of one way helps the other; each phase builds its
datasets afresh (an empty cache). The ways alternate, and later epochs are summed up by their
median, so that a burst of load from elsewhere on the machine does not decide the ratio. Epoch 1 is
reported on its own: it is where our cache is filled.

    python -m bench.training [--epochs 4] [--db databases/animal.db]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS, ROOT, catalogue_db, machine, peak_rss_mb, table

WAYS = ("ours", "tutorial")
# decode: the images alone, as each way reads them; input: plus shuffling and augmentation, what
# fit consumes; fit: training epochs, each with its validation pass.
PHASES = ("decode", "input", "fit")
GROUPS = (("decode", "input"), ("fit",))  # phases measured in one process


def datasets(way: str, db: Path, image_size: int, batch_size: int, augment: bool, seed: int):
    """(train, val, labels, number of train images) the way `way` builds them."""
    import tensorflow as tf

    from databases import catalogue
    from steps import train

    hp = train.Hyperparameters(batch_size=batch_size, **({} if augment else {"augment": 0.0}))
    data = train.load_data(db, image_size)
    if way == "ours":
        return (*train.pipelines(data, hp, seed), data.labels, len(data.y_train))
    conn = catalogue.connect(db, readonly=True)
    try:
        store = catalogue.store_root(conn)
    finally:
        conn.close()
    options = dict(labels="inferred", label_mode="int", class_names=data.labels, image_size=(image_size,) * 2,
                   batch_size=batch_size, seed=seed, verbose=False)
    train_ds = keras_dataset(store / "train", shuffle=True, **options)
    val_ds = keras_dataset(store / "val", shuffle=False, **options)
    n_train = len(train_ds.file_paths)
    if n_train != len(data.y_train):
        print(f"warning: the folder holds {n_train} training images, the catalogue {len(data.y_train)}",
              file=sys.stderr)
    if augment:
        layers = train.augmenter(hp.augment, seed)
        train_ds = train_ds.map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return train_ds.prefetch(tf.data.AUTOTUNE), val_ds.prefetch(tf.data.AUTOTUNE), data.labels, n_train


def keras_dataset(folder: Path, **options):
    import keras

    return keras.utils.image_dataset_from_directory(folder, **options)


def measure(way: str, phase: str, db: Path, image_size: int, batch_size: int, epochs: int, seed: int) -> dict:
    """One (way, phase) in this process: per-epoch seconds, and the curves for `fit`."""
    import keras

    from steps import train

    keras.utils.set_random_seed(seed)
    train_ds, val_ds, labels, n_train = datasets(way, db, image_size, batch_size, phase != "decode", seed)
    seconds: list[float] = []
    result: dict = {"way": way, "phase": phase, "n_train": n_train, "epoch_s": seconds}
    if phase == "fit":
        hp = train.Hyperparameters(batch_size=batch_size)
        model = train.build_model(hp, image_size, len(labels))
        train.compile_model(model, hp, steps_per_epoch=-(-n_train // batch_size), epochs=epochs)
        # Wall time of each epoch as fit runs it: the training pass and the validation pass.
        clock = keras.callbacks.LambdaCallback(
            on_epoch_begin=lambda epoch, logs: seconds.append(-time.perf_counter()),
            on_epoch_end=lambda epoch, logs: seconds.__setitem__(-1, seconds[-1] + time.perf_counter()))
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[clock], verbose=0)
        result["history"] = {name: list(map(float, values)) for name, values in history.history.items()}
    else:
        for _ in range(epochs):
            start = time.perf_counter()
            for _batch in train_ds:
                pass
            seconds.append(time.perf_counter() - start)
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_child(args: argparse.Namespace, way: str, phases: tuple[str, ...], db: Path) -> list[dict]:
    """Some phases of one way, in a fresh Python process."""
    command = [sys.executable, "-m", "bench.training", "--child", f"{way}:{','.join(phases)}", "--db", str(db),
               "--epochs", str(args.epochs), "--image-size", str(args.image_size),
               "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plot(results: dict[tuple[str, str], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for way in WAYS:
        for phase, style in (("decode", ":"), ("input", "-")):
            r = results[way, phase]
            axes[0].plot(range(1, len(r["epoch_s"]) + 1), [r["n_train"] / s for s in r["epoch_s"]],
                         marker="o", linestyle=style, label=f"{way}: {phase}")
        fit = results[way, "fit"]
        epochs = range(1, len(fit["epoch_s"]) + 1)
        axes[1].plot(epochs, fit["epoch_s"], marker="o", label=way)
        axes[2].plot(epochs, fit["history"]["val_accuracy"], marker="o", label=f"{way}: val")
        axes[2].plot(epochs, fit["history"]["accuracy"], marker=".", linestyle="--", label=f"{way}: train")
    axes[0].set(title="Input pipeline alone", xlabel="epoch", ylabel="images / s (log)", yscale="log")
    axes[1].set(title="Training epoch (fit, with validation)", xlabel="epoch", ylabel="seconds", ylim=(0, None))
    axes[2].set(title="Accuracy: same model, same images", xlabel="epoch")
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def steady(seconds: list[float]) -> float:
    """Median of the epochs after the first (the first fills our cache and traces the graphs)."""
    return statistics.median(seconds[1:] or seconds)


def report(results: dict[tuple[str, str], dict]) -> float:
    """Prints the table; returns our steady-state speed-up per training epoch."""
    names = {"decode": "images only", "input": "input pipeline (+ shuffle, augment)", "fit": "training epoch"}
    rows = []
    for phase in PHASES:
        base = steady(results["tutorial", phase]["epoch_s"])
        for way in WAYS:
            r = results[way, phase]
            first, later = r["epoch_s"][0], steady(r["epoch_s"])
            rows.append([names[phase], way, first, r["n_train"] / first, later, r["n_train"] / later,
                         f"{base / later:.2f}x", r["peak_rss_mb"]])
    onednn = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset (TF's default: on)")
    table(f"Training, {results['ours', 'fit']['n_train']} images per epoch; later = median of epochs 2+ "
          f"(TF_ENABLE_ONEDNN_OPTS={onednn})",
          ["what", "way", "epoch 1 s", "epoch 1 img/s", "later s", "later img/s", "speed-up (later)",
           "peak RSS MB"], rows)
    final = {way: results[way, "fit"]["history"]["val_accuracy"][-1] for way in WAYS}
    print("val_accuracy after the last epoch: " + ", ".join(f"{way} {acc:.3f}" for way, acc in final.items()))
    return steady(results["tutorial", "fit"]["epoch_s"]) / steady(results["ours", "fit"]["epoch_s"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, help="catalogue (default: databases/animal.db, else one made in --workdir)")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per way (the first one is reported apart)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--workdir", type=Path, default=RESULTS / "pipeline",
                        help="where to make data if the project has none")
    parser.add_argument("--images-per-class", type=int, default=600)
    parser.add_argument("--plot", type=Path, default=RESULTS / "training.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # way:phase,phase measured in this process
    args = parser.parse_args(argv)

    if args.child:
        way, phases = args.child.split(":")
        print(json.dumps([measure(way, phase, args.db, args.image_size, args.batch_size, args.epochs, args.seed)
                          for phase in phases.split(",")]))
        return 0
    db = args.db or catalogue_db(args.workdir, args.images_per_class)
    print(f"machine: {machine()}\ncatalogue: {db}", flush=True)
    results = {}
    for phases in GROUPS:
        for way in WAYS:
            print(f"measuring {way}: {', '.join(phases)} ({args.epochs} epochs each) ...", flush=True)
            results.update({(way, r["phase"]): r for r in run_child(args, way, phases, db)})
    speedup = report(results)
    plot(results, args.plot)
    print(f"\ntarget: steady-state training epoch at least 2x faster than the tutorial way: {speedup:.2f}x "
          f"({'met' if speedup >= 2 else 'missed'})\nplot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
