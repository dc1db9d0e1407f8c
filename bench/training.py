"""Training at AFHQ's scale: per-epoch speed and memory, ours vs the Keras-tutorial way, same images and model.

* ours: `train.load_data` (each catalogue image decoded once by `load_image`, at reduced scale for
  JPEG, then cached in memory as uint8) + `train.pipelines` (shuffle, batch, augment, prefetch) +
  `train.build_model`;
* tutorial: `keras.utils.image_dataset_from_directory` over the same image folder, which reads and
  decodes every file anew each epoch (TensorFlow's defaults: full decode, bilinear resize, float32),
  with the augmentation mapped over its batches and prefetch, as the Keras "image classification
  from scratch" example does, and the same `build_model` and augmentation layers.

The images are AFHQ-sized by default: the synthetic rehearsal (`extract --synthetic-size 512`: 512 px
JPEGs of AFHQ's quality and weight), made once into bench/results/ and reused. `--db` measures
another catalogue (a real AFHQ download, once populated).

Each (way, phase) runs in its own Python process, so its peak memory (ru_maxrss) and CPU time are
its own and nothing of one way helps the other; each builds its datasets afresh (an empty cache).
Later epochs are summed up by their median, so that a burst of load from elsewhere does not decide
the ratio; epoch 1 is reported on its own: it is where our cache is filled. Phases:

* images only: the training images as each way reads them (decode, resize; ours from the cache after epoch 1);
* input pipeline: plus shuffling and augmentation, what fit consumes;
* training epoch: fit with its validation pass, the default hyperparameters (augmentation on);
* ours without augmentation: the network's forward and backward passes (and validation) alone.

    python -m bench.training                                   # 500 per class at 512 px: minutes
    python -m bench.training --images-per-class 5000 --epochs 3  # AFHQ's scale
    python -m bench.training --sizes 64,96,128                 # + our epoch at each image size
    python -m bench.training --filters 8                       # a narrower network on both sides
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from bench.common import RESULTS, ROOT, machine, peak_rss_mb, table
from steps import defaults
from steps.defaults import Hyperparameters

WAYS = ("ours", "tutorial")
# Phases measured in one process each: (way, phases).
CHILDREN = (
    ("ours", ("decode", "input")),
    ("tutorial", ("decode", "input")),
    ("ours", ("fit",)),
    ("tutorial", ("fit",)),
    ("ours", ("plain",)),
)
NAMES = {
    "decode": "images only",
    "input": "input pipeline (+ shuffle, augment)",
    "fit": "training epoch",
    "plain": "training epoch, no augmentation",
}


def rehearsal_db(images_per_class: int, synthetic_size: int) -> Path:
    """A synthetic catalogue of AFHQ-sized images in bench/results/, made once (extract and populate
    skip what is there already)."""
    from steps.extract import extract
    from steps.populate import populate

    workdir = RESULTS / f"rehearsal-{images_per_class}x{synthetic_size}"
    images, metadata, db = workdir / "images", workdir / "metadata.csv", workdir / "catalogue.db"
    if not db.is_file():
        print(f"making {3 * images_per_class:,} synthetic images of {synthetic_size} px in {workdir}", flush=True)
        extract("synthetic", images, metadata, images_per_class=images_per_class, synthetic_size=synthetic_size)
        populate(metadata, images, db)
    return db


def datasets(way: str, db: Path, image_size: int, hp: Hyperparameters, augment: bool, seed: int):
    """(train, val, labels, number of train images) the way `way` builds them."""
    import tensorflow as tf

    from databases import catalogue
    from steps import train

    hp = hp if augment else replace(hp, augment=0.0)
    batch_size = hp.batch_size
    if way == "ours":
        data = train.load_data(db, image_size)
        return (*train.pipelines(data, hp, seed), data.labels, len(data.y_train))
    # The tutorial way reads nothing but the folder; the catalogue only names the classes, in our order.
    conn = catalogue.connect(db, readonly=True)
    try:
        store, frame = catalogue.store_root(conn), catalogue.images(conn, split="train")
    finally:
        conn.close()
    labels = sorted(frame.label.unique())
    options = dict(
        labels="inferred",
        label_mode="int",
        class_names=labels,
        image_size=(image_size,) * 2,
        batch_size=batch_size,
        seed=seed,
        verbose=False,
    )
    train_ds = keras_dataset(store / "train", shuffle=True, **options)
    val_ds = keras_dataset(store / "val", shuffle=False, **options)
    n_train = len(train_ds.file_paths)
    if n_train != len(frame):
        print(f"warning: the folder holds {n_train} training images, the catalogue {len(frame)}", file=sys.stderr)
    if augment:
        layers = train.Augmentation(hp.augment, seed)
        train_ds = train_ds.map(lambda x, y: (layers(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return train_ds.prefetch(tf.data.AUTOTUNE), val_ds.prefetch(tf.data.AUTOTUNE), labels, n_train


def keras_dataset(folder: Path, **options):
    import keras

    return keras.utils.image_dataset_from_directory(folder, **options)


def measure(way: str, phase: str, db: Path, image_size: int, hp: Hyperparameters, epochs: int, seed: int) -> dict:
    """One (way, phase) in this process: per-epoch seconds (wall and this process's CPU), and the
    curves for the fit phases."""
    import keras

    from steps import train

    keras.utils.set_random_seed(seed)
    started = time.perf_counter()
    train_ds, val_ds, labels, n_train = datasets(way, db, image_size, hp, phase in ("input", "fit"), seed)
    seconds: list[float] = []
    cpu_seconds: list[float] = []
    result: dict = {
        "way": way,
        "phase": phase,
        "n_train": n_train,
        "epoch_s": seconds,
        "epoch_cpu_s": cpu_seconds,
        "setup_s": time.perf_counter() - started,
    }

    def begin(*_) -> None:
        seconds.append(-time.perf_counter())
        cpu_seconds.append(-time.process_time())

    def end(*_) -> None:
        seconds[-1] += time.perf_counter()
        cpu_seconds[-1] += time.process_time()

    if phase in ("fit", "plain"):
        model = train.build_model(hp, image_size, len(labels))
        train.compile_model(model, hp, steps_per_epoch=-(-n_train // hp.batch_size), epochs=epochs)
        # Each epoch as fit runs it: the training pass and the validation pass.
        clock = keras.callbacks.LambdaCallback(on_epoch_begin=begin, on_epoch_end=end)
        history = model.fit(train_ds, validation_data=val_ds, epochs=epochs, callbacks=[clock], verbose=0)
        result["history"] = {name: list(map(float, values)) for name, values in history.history.items()}
        result["parameters"] = model.count_params()
    else:
        for _ in range(epochs):
            begin()
            for _batch in train_ds:
                pass
            end()
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_child(args: argparse.Namespace, way: str, phases: tuple[str, ...], db: Path, image_size: int) -> list[dict]:
    """Some phases of one way, in a fresh Python process."""
    command = [
        sys.executable,
        "-m",
        "bench.training",
        "--child",
        f"{way}:{','.join(phases)}",
        "--db",
        str(db),
        "--epochs",
        str(args.epochs),
        "--image-size",
        str(image_size),
        "--batch-size",
        str(args.batch_size),
        "--filters",
        str(args.filters),
        "--seed",
        str(args.seed),
    ]
    out = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{way} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady(seconds: list[float]) -> float:
    """Median of the epochs after the first (the first fills our cache and traces the graphs)."""
    return statistics.median(seconds[1:] or seconds)


def first_epoch(result: dict) -> float:
    """Epoch 1 with its setup: reading the catalogue, listing the files, and (ours) decoding every
    image into the cache, which happens before fit."""
    return result["setup_s"] + result["epoch_s"][0]


def cache_mb(n_images: int, image_size: int) -> float:
    """What our decoded-image cache holds: uint8 RGB, one array per image."""
    return n_images * image_size * image_size * 3 / 2**20


def report(results: dict[tuple[str, str], dict], n_val: int, image_size: int) -> float:
    """Prints the tables; returns our steady-state speed-up per training epoch."""
    rows = []
    for phase in ("decode", "input", "fit", "plain"):
        base = steady(results["tutorial", phase]["epoch_s"]) if ("tutorial", phase) in results else None
        for way in WAYS:
            if (way, phase) not in results:
                continue
            r = results[way, phase]
            first, later = first_epoch(r), steady(r["epoch_s"])
            rows.append(
                [
                    NAMES[phase],
                    way,
                    first,
                    r["n_train"] / first,
                    later,
                    r["n_train"] / later,
                    f"{base / later:.2f}x" if base else "-",
                    steady(r["epoch_cpu_s"]),
                    r["peak_rss_mb"],
                ]
            )
    n_train = results["ours", "fit"]["n_train"]
    table(
        f"Training at {image_size} px, {n_train:,} training + {n_val:,} validation images per epoch; later = median of epochs 2+",
        [
            "what",
            "way",
            "epoch 1 s (with setup)",
            "epoch 1 img/s",
            "later s",
            "later img/s",
            "speed-up (later)",
            "later CPU s",
            "peak RSS MB",
        ],
        rows,
    )
    print("network: " + ", ".join(f"{way} {results[way, 'fit']['parameters']:,} parameters" for way in WAYS))
    final = {way: results[way, "fit"]["history"]["val_accuracy"][-1] for way in WAYS}
    print("val_accuracy after the last epoch: " + ", ".join(f"{way} {acc:.3f}" for way, acc in final.items()))

    # Where a steady-state epoch goes. Decoding: what the tutorial way's images-only pass costs each
    # epoch (ours pays it once). Augmentation: its cost alone (input pipeline minus cached images), and
    # what it adds to our training epoch (the critical path). Network: our epoch without augmentation.
    decode = steady(results["tutorial", "decode"]["epoch_s"])
    augment_alone = steady(results["ours", "input"]["epoch_s"]) - steady(results["ours", "decode"]["epoch_s"])
    plain = steady(results["ours", "plain"]["epoch_s"])
    ours, tutorial = steady(results["ours", "fit"]["epoch_s"]), steady(results["tutorial", "fit"]["epoch_s"])
    table(
        "Where a steady-state epoch goes (seconds)",
        ["part", "seconds", "share of the tutorial's epoch"],
        [
            ["decode + resize every image (tutorial, every epoch)", decode, f"{decode / tutorial:.0%}"],
            [
                "ours: decode every image once, before epoch 1 (train + val)",
                results["ours", "fit"]["setup_s"],
                f"{results['ours', 'fit']['setup_s'] / tutorial:.0%}",
            ],
            ["augmentation, alone", augment_alone, f"{augment_alone / tutorial:.0%}"],
            ["augmentation, added to our training epoch", ours - plain, f"{(ours - plain) / tutorial:.0%}"],
            ["network: forward + backward + validation (ours, no augmentation)", plain, f"{plain / tutorial:.0%}"],
            ["our training epoch", ours, f"{ours / tutorial:.0%}"],
            ["the tutorial's training epoch", tutorial, "100%"],
        ],
    )
    print(
        f"our cache at this size: {cache_mb(n_train + n_val, image_size):,.1f} MB "
        f"({n_train + n_val:,} images x {image_size}x{image_size}x3 bytes)"
    )
    return tutorial / ours


def sizes_report(args: argparse.Namespace, db: Path, sizes: list[int], n_val: int) -> None:
    """Our training epoch at each image size (ours only: the choice a user makes)."""
    rows = []
    for size in sizes:
        print(f"measuring ours at {size} px ...", flush=True)
        (r,) = run_child(args, "ours", ("fit",), db, size)
        later = steady(r["epoch_s"])
        rows.append(
            [
                size,
                first_epoch(r),
                later,
                r["n_train"] / later,
                cache_mb(r["n_train"] + n_val, size),
                r["peak_rss_mb"],
                r["history"]["val_accuracy"][-1],
            ]
        )
    table(
        f"Our training epoch by image size ({args.epochs} epochs each)",
        ["image size", "epoch 1 s (with setup)", "later s", "later img/s", "cache MB", "peak RSS MB", "val_accuracy (last epoch)"],
        rows,
    )


def plot(results: dict[tuple[str, str], dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for way in WAYS:
        for phase, style in (("decode", ":"), ("input", "-")):
            r = results[way, phase]
            axes[0].plot(
                range(1, len(r["epoch_s"]) + 1),
                [r["n_train"] / s for s in r["epoch_s"]],
                marker="o",
                linestyle=style,
                label=f"{way}: {phase}",
            )
        fit = results[way, "fit"]
        epochs = range(1, len(fit["epoch_s"]) + 1)
        axes[1].plot(epochs, fit["epoch_s"], marker="o", label=way)
        axes[2].plot(epochs, fit["history"]["val_accuracy"], marker="o", label=f"{way}: val")
        axes[2].plot(epochs, fit["history"]["accuracy"], marker=".", linestyle="--", label=f"{way}: train")
    plain = results["ours", "plain"]
    axes[1].plot(range(1, len(plain["epoch_s"]) + 1), plain["epoch_s"], marker="x", linestyle=":", label="ours, no augmentation")
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


def val_count(db: Path) -> int:
    from bench.common import catalogue_rows

    return len(catalogue_rows(db, split="val"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", type=Path, help="catalogue to measure (default: the synthetic rehearsal below)")
    parser.add_argument(
        "--images-per-class", type=int, default=500, help="rehearsal: train + val per class (AFHQ: about 5,400; 5000 rehearses it)"
    )
    parser.add_argument("--synthetic-size", type=int, default=512, help="rehearsal: pixels per side of the files")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per way (the first one is reported apart)")
    parser.add_argument("--image-size", type=int, default=defaults.IMAGE_SIZE)
    parser.add_argument("--sizes", default="", help="also our epoch at these image sizes, e.g. 64,96,128")
    parser.add_argument("--batch-size", type=int, default=Hyperparameters.batch_size)
    parser.add_argument(
        "--filters",
        type=int,
        default=Hyperparameters.filters,
        help="the network's width, on both sides (a cheaper network step: the pipeline counts more)",
    )
    parser.add_argument("--seed", type=int, default=defaults.SEED)
    parser.add_argument("--plot", type=Path, default=RESULTS / "training.png")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # way:phase,phase measured in this process
    args = parser.parse_args(argv)

    if args.child:
        way, phases = args.child.split(":")
        hp = Hyperparameters(batch_size=args.batch_size, filters=args.filters)
        print(json.dumps([measure(way, phase, args.db, args.image_size, hp, args.epochs, args.seed) for phase in phases.split(",")]))
        return 0
    db = args.db or rehearsal_db(args.images_per_class, args.synthetic_size)
    n_val = val_count(db)
    print(f"machine: {machine()}\ncatalogue: {db}", flush=True)
    results = {}
    for way, phases in CHILDREN:
        print(f"measuring {way}: {', '.join(phases)} ({args.epochs} epochs each) ...", flush=True)
        results.update({(way, r["phase"]): r for r in run_child(args, way, phases, db, args.image_size)})
    speedup = report(results, n_val, args.image_size)
    first = first_epoch(results["tutorial", "fit"]) / first_epoch(results["ours", "fit"])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "training.json").write_text(json.dumps({f"{w}:{p}": r for (w, p), r in results.items()}))
    plot(results, args.plot)
    if args.sizes:
        sizes_report(args, db, [int(s) for s in args.sizes.split(",")], n_val)
    print(
        f"\ntargets: steady-state training epoch at least 2x faster than the tutorial way: {speedup:.2f}x "
        f"({'met' if speedup >= 2 else 'missed'}); first epoch no slower: {first:.2f}x "
        f"({'met' if first >= 1 else 'missed'})\nmachine after: {machine()}\nplot: {args.plot}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
