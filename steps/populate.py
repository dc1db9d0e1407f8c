"""populate: metadata CSV -> catalogue, SQLite or PostgreSQL (idempotent upsert keyed by content hash).

Every row is checked against the image store first: a row whose file is missing, changed or
outside the store, whose label is not one extract writes, whose sizes are not positive integers
(ASCII digits), that holds a NUL byte, or whose content an earlier row already has (the same photo
under two names) is reported and not inserted. A file that is not a CSV of UTF-8 text (or has a
field over 128 KiB) is refused whole, in one line, before the catalogue is touched. Running it
twice changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sqlite3
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from databases import catalogue
from databases.image_store import FolderStore, ObjectStore, open_store, root_argument
from steps import defaults
from steps.extract import LABELS
from steps.progress import progress
from steps.tracking import start_run
from team.preflight import one_line_errors

log = logging.getLogger("populate")

SPLITS = ("train", "val")
MAX_PATH, MAX_NAME = 1024, 255  # characters in a path, bytes in one of its names: what the page serves
BATCH_ROWS = 1000  # rows per upsert statement batch (all in the run's one transaction)


class MetadataError(ValueError):
    """The metadata file as a whole cannot be read as a CSV; the message says where, in one line."""


@dataclass
class PopulateReport:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[str] = field(default_factory=list)  # "<path>: <why>"


def populate(metadata_csv: Path, image_store: Path | str, db_path: Path | str) -> PopulateReport:
    """The CSV's valid rows into the catalogue (a SQLite file or postgresql://...), the images checked
    in the store (a folder or s3://bucket/prefix)."""
    if not metadata_csv.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {metadata_csv} (run the extract step first)")
    total = _count_rows(metadata_csv)  # a whole pass first: a file that is not a CSV is refused before any write
    report = PopulateReport()
    seen: dict[str, str] = {}  # sha256 -> path: the same content twice would flip its row's path on every run
    store = open_store(image_store)
    conn = catalogue.connect(db_path)
    try:
        # In batches, so memory stays flat at any size, and all in one transaction: a run that fails
        # midway leaves the catalogue as it was (store root included); the next run does it all.
        with catalogue.transaction(conn):
            catalogue.set_store_root(conn, image_store)
            batch: list[dict] = []
            for row in progress(_rows(metadata_csv), total, "populate", unit="row"):
                problem = _problem(row, store)
                if not problem and row["sha256"] in seen:
                    problem = f"same content as {seen[row['sha256']]}"
                elif not problem:
                    seen[row["sha256"]] = row["path"]
                if problem:
                    report.rejected.append(f"{row.get('path')}: {problem}")
                    log.warning("not inserted: %s: %s", row.get("path"), problem)
                    continue
                batch.append(row)
                if len(batch) == BATCH_ROWS:
                    _upsert(conn, batch, report)
                    batch = []
            _upsert(conn, batch, report)
    finally:
        conn.close()
    return report


def _rows(metadata_csv: Path) -> Iterator[dict]:
    with metadata_csv.open(newline="", encoding="utf-8") as handle:
        yield from csv.DictReader(handle)


def _count_rows(metadata_csv: Path) -> int:
    """Rows of the CSV (for the progress bar): a quick pass that parses nothing but the quoting, and
    so finds what would stop the real pass midway. Raises MetadataError."""
    rows, line = 0, 0
    try:
        with metadata_csv.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle)
            for _ in reader:
                rows, line = rows + 1, reader.line_num
    except UnicodeDecodeError:
        raise MetadataError(f"{metadata_csv} is not UTF-8 text (after line {line}): not a metadata CSV") from None
    except csv.Error as error:
        raise MetadataError(f"{metadata_csv}, after line {line}: {error}: not a metadata CSV") from None
    return max(0, rows - 1)


def _upsert(conn: sqlite3.Connection, rows: list[dict], report: PopulateReport) -> None:
    if rows:
        counts = catalogue.upsert_images(conn, rows)
        report.inserted += counts.inserted
        report.updated += counts.updated
        report.unchanged += counts.unchanged


def _problem(row: dict, store: FolderStore | ObjectStore) -> str | None:
    """Why this CSV row cannot go into the catalogue, or None."""
    missing = [c for c in catalogue.COLUMNS if not row.get(c) and c != "attributes"]
    if missing:
        return f"missing {', '.join(missing)}"
    held = [c for c in catalogue.COLUMNS if "\0" in (row.get(c) or "")]
    if held:  # no file name has one, and PostgreSQL refuses it in text
        return f"{', '.join(held)} holds a NUL byte"
    path = PurePosixPath(row["path"])
    if path.is_absolute() or ".." in path.parts:
        return "path must be relative to the image store"
    if len(row["path"]) > MAX_PATH or any(len(part.encode()) > MAX_NAME for part in path.parts):
        return f"path longer than {MAX_PATH} characters or with a name over {MAX_NAME} bytes"
    if row["split"] not in SPLITS:
        return f"unknown split {row['split']!r}"
    if row["label"] not in LABELS:
        return f"unknown label {row['label'][:100]!r} (expected one of {', '.join(LABELS)})"
    for column in ("width", "height", "bytes"):
        # isdigit() alone takes '٣' (Arabic-Indic three) and int() reads it as 3
        if not (row[column].isascii() and row[column].isdigit()) or int(row[column]) <= 0:
            return f"{column} must be a positive integer, not {row[column][:100]!r}"
    digest = store.sha256(path.as_posix())  # streamed, in either kind of store
    if digest is None:
        return "file missing from the image store"
    if digest != row["sha256"]:
        return "file content differs from its sha256"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata", type=Path, default=defaults.METADATA)
    parser.add_argument("--image-store", type=root_argument, default=defaults.IMAGE_STORE, help="a folder or s3://bucket/prefix")
    parser.add_argument(
        "--db", type=catalogue.location, default=defaults.CATALOGUE, help="a SQLite file or postgresql://user@host:port/database"
    )
    return parser


@one_line_errors("populate")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = populate(args.metadata, args.image_store, args.db)
    except (FileNotFoundError, MetadataError) as error:
        print(f"populate: error: {error}", file=sys.stderr)
        return 2
    if "MLFLOW_RUN_ID" in os.environ:
        import mlflow

        with start_run("populate"):
            mlflow.log_params({**vars(args), "db": catalogue.describe(args.db)})
            mlflow.log_metrics(
                {"inserted": report.inserted, "updated": report.updated, "unchanged": report.unchanged, "rejected": len(report.rejected)}
            )
    print(
        f"populate: {report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged, "
        f"{len(report.rejected)} rejected -> {catalogue.describe(args.db)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
