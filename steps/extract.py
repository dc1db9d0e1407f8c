"""extract: a source of images -> the image store (<split>/<label>/<file>) + a metadata CSV.

The source is `synthetic` (the embedded, seeded generator) or an AFHQ download: a folder or a
.zip laid out as {train,val}/{cat,dog,wild}/*.jpg, optionally under one top folder (afhq/).
Unreadable or non-image files are skipped with a warning and counted; they never stop a run.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from databases.image_store import FolderStore, ObjectStore, open_store, root_argument
from pyfunc.preprocess import ImageError, load_image
from steps import defaults
from steps.progress import progress
from steps.tracking import start_run
from team.preflight import one_line_errors

log = logging.getLogger("extract")

SPLITS = ("train", "val")
LABELS = ("cat", "dog", "wild")
MAX_FILE_BYTES = 50 * 1024 * 1024
MIN_SYNTHETIC_SIZE, MAX_SYNTHETIC_SIZE = 16, 2048
PARALLEL_FROM = 100  # synthetic images per drawing process, at least: below, starting a pool costs more
CSV_COLUMNS = ["path", "split", "label", "sha256", "width", "height", "bytes", "source", "attributes"]
# What reading one file of a folder or one entry of a .zip can raise when that file is damaged.
UNREADABLE = (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)


class SourceError(Exception):
    """The source is missing or not laid out as expected."""


@dataclass
class ExtractReport:
    written: int = 0
    unchanged: int = 0
    skipped: list[str] = field(default_factory=list)  # "<name>: <why>"
    ignored: int = 0  # files outside {train,val}/{cat,dog,wild}/


@dataclass(frozen=True)
class SourceImage:
    split: str
    label: str
    name: str
    data: bytes
    attributes: dict


def extract(
    source: str,
    image_store: Path | str,
    metadata_csv: Path,
    images_per_class: int = defaults.IMAGES_PER_CLASS,
    val_fraction: float = defaults.VAL_FRACTION,
    seed: int = defaults.SEED,
    synthetic_size: int = defaults.SYNTHETIC_SIZE,
) -> ExtractReport:
    """Write every usable image of `source` into the store (a folder or s3://bucket/prefix) and list them
    all in `metadata_csv`.

    One image at a time: memory stays flat whatever the source's size, and the CSV is written as
    the images go, under a temporary name that becomes `metadata_csv` only once it is complete."""
    report = ExtractReport()
    store = open_store(image_store)
    if source == "synthetic":
        if not MIN_SYNTHETIC_SIZE <= synthetic_size <= MAX_SYNTHETIC_SIZE:
            raise SourceError(f"synthetic_size must be {MIN_SYNTHETIC_SIZE} to {MAX_SYNTHETIC_SIZE} pixels, not {synthetic_size}")
        images = _synthetic(images_per_class, val_fraction, seed, synthetic_size)
        total, source_name = len(LABELS) * images_per_class, "synthetic"
    else:
        images, total, source_name = _afhq(Path(source), report)

    metadata_csv.parent.mkdir(parents=True, exist_ok=True)
    partial = metadata_csv.with_name(f".{metadata_csv.name}.partial")
    rows = 0
    try:
        with partial.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
            writer.writeheader()
            for image in progress(images, total or None, "extract"):
                row = _row(image, store, source_name, report)
                if row:
                    writer.writerow(row)
                    rows += 1
        if not rows:
            raise SourceError(f"no usable images in {source} ({len(report.skipped)} skipped)")
        os.replace(partial, metadata_csv)  # a killed run never leaves half a CSV under the real name
    finally:
        partial.unlink(missing_ok=True)
    return report


def _row(image: SourceImage, store: FolderStore | ObjectStore, source_name: str, report: ExtractReport) -> dict | None:
    """Check and store one image; its CSV row, or None if it is skipped."""
    try:
        width, height = _check_image(image.data)
    except ImageError as error:
        report.skipped.append(f"{image.split}/{image.label}/{image.name}: {error}")
        log.warning("skipped %s/%s/%s: %s", image.split, image.label, image.name, error)
        return None
    return {
        "path": _store(image, store, report),
        "split": image.split,
        "label": image.label,
        "sha256": hashlib.sha256(image.data).hexdigest(),
        "width": width,
        "height": height,
        "bytes": len(image.data),
        "source": source_name,
        "attributes": json.dumps(image.attributes, sort_keys=True),
    }


def _synthetic(images_per_class: int, val_fraction: float, seed: int, size: int) -> Iterator[SourceImage]:
    """The generator's images, in a fixed order; drawn by a pool of processes when there are many."""
    n_val = round(images_per_class * val_fraction)
    tasks = [
        (split, label, [seed, split_index, label_index, i], size)
        for split_index, (split, count) in enumerate((("train", images_per_class - n_val), ("val", n_val)))
        for label_index, label in enumerate(LABELS)
        for i in range(count)
    ]
    workers = min(os.cpu_count() or 1, len(tasks) // PARALLEL_FROM)
    if workers < 2:
        yield from map(_draw, tasks)
        return
    # Drawing is the slow part (about 10 ms a face, 25 ms at 512 px with the JPEG): one process
    # per core. `spawn`: a forked copy of a process that has loaded TensorFlow can deadlock.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_draw, tasks, chunksize=16)


def _draw(task: tuple[str, str, list[int], int]) -> SourceImage:
    from steps.synthetic import IMAGE_SIZE, PHOTO_QUALITY, draw_face, draw_photo

    split, label, seed, size = task
    # Each image has its own seed: growing the data set never changes existing images.
    if size > IMAGE_SIZE:
        image, attributes = draw_photo(label, seed, size)
        quality = PHOTO_QUALITY
    else:
        image, attributes = draw_face(label, seed, size)
        quality = 92
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return SourceImage(split, label, f"synthetic_{label}_{seed[-1]:05d}.jpg", buffer.getvalue(), attributes)


def _afhq(source: Path, report: ExtractReport) -> tuple[Iterator[SourceImage], int, str]:
    if not source.exists():
        raise SourceError(f"source not found: {source} (use 'synthetic' or an AFHQ folder or .zip)")
    if source.is_dir():
        entries = {p.relative_to(source).as_posix(): p for p in sorted(source.rglob("*")) if p.is_file()}
        size = lambda p: p.stat().st_size  # noqa: E731
        read = lambda p: p.read_bytes()  # noqa: E731
    elif zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        entries = {i.filename: i for i in archive.infolist() if not i.is_dir()}
        size = lambda i: i.file_size  # noqa: E731
        read = lambda i: _read_member(archive, i)  # noqa: E731
    else:
        raise SourceError(f"source is neither a folder nor a .zip file: {source}")

    laid_out = [(name, parts) for name, parts in ((n, _layout(n)) for n in entries) if parts]
    report.ignored = len(entries) - len(laid_out)
    if not laid_out:
        raise SourceError(
            f"no images laid out as {{train,val}}/{{cat,dog,wild}}/<file> in {source} (optionally under one top folder such as afhq/)"
        )

    def images() -> Iterator[SourceImage]:
        for name, (split, label, filename) in laid_out:
            entry = entries[name]
            if size(entry) > MAX_FILE_BYTES:
                report.skipped.append(f"{name}: file larger than {MAX_FILE_BYTES // 2**20} MB")
                log.warning("skipped %s: file too large", name)
                continue
            try:
                data = read(entry)
            except UNREADABLE as error:  # a corrupt .zip entry (bad CRC, cut short) or an unreadable file
                report.skipped.append(f"{name}: cannot be read ({error})")
                log.warning("skipped %s: cannot be read: %s", name, error)
                continue
            yield SourceImage(split, label, filename, data, {})

    return images(), len(laid_out), source.name


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    """The entry's bytes, decompressed in one bounded read: archive.read() would decompress a member
    whose header lies about its size (1,000 bytes declared, 1 GiB inside) whole before checking it."""
    with archive.open(info) as member:
        data = member.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise OSError(f"larger than {MAX_FILE_BYTES // 2**20} MB")
    return data


def _layout(name: str) -> tuple[str, str, str] | None:
    """(split, label, safe file name) for '[top/]split/label/file', else None."""
    parts = name.split("/")
    if len(parts) not in (3, 4) or parts[-3] not in SPLITS or parts[-2] not in LABELS:
        return None
    filename = parts[-1]
    if filename.startswith("."):  # .DS_Store, ._* resource forks from macOS archives
        return None
    return parts[-3], parts[-2], _safe_name(filename)


def _safe_name(filename: str) -> str:
    """A file name safe in any store (folder or bucket): letters, digits, '.', '_' and '-'."""
    stem, dot, suffix = filename.rpartition(".")
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", stem if dot else filename).strip("_") or "image"
    suffix = re.sub(r"[^A-Za-z0-9]+", "", suffix if dot else "").lower()
    return f"{stem[:100]}.{suffix[:8]}" if suffix else stem[:100]


def _check_image(data: bytes) -> tuple[int, int]:
    """Width and height of a usable image; decodes it the way training will, or raises ImageError."""
    load_image(data, 32)
    return Image.open(io.BytesIO(data)).size


def _store(image: SourceImage, store: FolderStore | ObjectStore, report: ExtractReport) -> str:
    """Write the image into the store unless it is already there; returns its relative path. Writes
    are atomic in both kinds of store: a killed run never leaves half a file under the real name."""
    relative = f"{image.split}/{image.label}/{image.name}"
    existing = store.read(relative)
    if existing is not None:
        if existing == image.data:
            report.unchanged += 1
            return relative
        # Another image already has this name: keep both rather than overwrite one.
        stem, _, suffix = image.name.rpartition(".")
        relative = f"{image.split}/{image.label}/{stem}-{hashlib.sha256(image.data).hexdigest()[:12]}.{suffix}"
        if store.read(relative) is not None:
            report.unchanged += 1
            return relative
    store.write(relative, image.data)
    report.written += 1
    return relative


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default=defaults.SOURCE, help="'synthetic' or an AFHQ folder or .zip")
    parser.add_argument("--image-store", type=root_argument, default=defaults.IMAGE_STORE, help="a folder or s3://bucket/prefix")
    parser.add_argument("--metadata", type=Path, default=defaults.METADATA)
    parser.add_argument("--images-per-class", type=int, default=defaults.IMAGES_PER_CLASS, help="synthetic only: train + val")
    parser.add_argument("--val-fraction", type=float, default=defaults.VAL_FRACTION, help="synthetic only")
    parser.add_argument("--seed", type=int, default=defaults.SEED, help="synthetic only")
    parser.add_argument(
        "--synthetic-size",
        type=int,
        default=defaults.SYNTHETIC_SIZE,
        help="synthetic only: pixels per side of the image files (512: AFHQ's size and weight)",
    )
    return parser


@one_line_errors("extract")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = extract(
            args.source, args.image_store, args.metadata, args.images_per_class, args.val_fraction, args.seed, args.synthetic_size
        )
    except SourceError as error:
        print(f"extract: error: {error}", file=sys.stderr)
        return 2
    _log_to_mlflow(args, report)
    print(
        f"extract: {report.written} written, {report.unchanged} already in the store, "
        f"{len(report.skipped)} skipped, {report.ignored} ignored (outside the layout) -> {args.metadata}"
    )
    return 0


def _log_to_mlflow(args: argparse.Namespace, report: ExtractReport) -> None:
    """Inside `mlflow run`, record what this step did in its run."""
    if "MLFLOW_RUN_ID" not in os.environ:
        return
    import mlflow

    with start_run("extract"):
        mlflow.log_params(vars(args))
        mlflow.log_metrics(
            {"written": report.written, "unchanged": report.unchanged, "skipped": len(report.skipped), "ignored": report.ignored}
        )
        if report.skipped:
            mlflow.log_text("\n".join(report.skipped), "skipped.txt")


if __name__ == "__main__":
    sys.exit(main())
