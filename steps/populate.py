"""populate: metadata CSV -> SQLite catalogue (idempotent upsert keyed by content hash).

Every row is checked against the image store first: a row whose file is missing, changed or
outside the store, whose sizes are not positive integers, or whose content an earlier row already
has (the same photo under two names) is reported and not inserted. Running it twice changes nothing.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from databases import catalogue
from steps import defaults
from steps.tracking import start_run

log = logging.getLogger("populate")

SPLITS = ("train", "val")


@dataclass
class PopulateReport:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejected: list[str] = field(default_factory=list)  # "<path>: <why>"


def populate(metadata_csv: Path, image_store: Path, db_path: Path) -> PopulateReport:
    if not metadata_csv.is_file():
        raise FileNotFoundError(f"metadata CSV not found: {metadata_csv} (run the extract step first)")
    report = PopulateReport()
    rows = []
    seen: dict[str, str] = {}  # sha256 -> path: the same content twice would flip its row's path on every run
    with metadata_csv.open(newline="") as handle:
        for row in csv.DictReader(handle):
            problem = _problem(row, image_store)
            if not problem and row["sha256"] in seen:
                problem = f"same content as {seen[row['sha256']]}"
            elif not problem:
                seen[row["sha256"]] = row["path"]
            if problem:
                report.rejected.append(f"{row.get('path')}: {problem}")
                log.warning("not inserted: %s: %s", row.get("path"), problem)
            else:
                rows.append(row)
    conn = catalogue.connect(db_path)
    try:
        with conn:
            catalogue.set_store_root(conn, image_store)
        counts = catalogue.upsert_images(conn, rows)
    finally:
        conn.close()
    report.inserted, report.updated, report.unchanged = counts.inserted, counts.updated, counts.unchanged
    return report


def _problem(row: dict, image_store: Path) -> str | None:
    """Why this CSV row cannot go into the catalogue, or None."""
    missing = [c for c in catalogue.COLUMNS if not row.get(c) and c != "attributes"]
    if missing:
        return f"missing {', '.join(missing)}"
    path = PurePosixPath(row["path"])
    if path.is_absolute() or ".." in path.parts:
        return "path must be relative to the image store"
    if row["split"] not in SPLITS:
        return f"unknown split {row['split']!r}"
    for column in ("width", "height", "bytes"):
        if not row[column].isdigit() or int(row[column]) <= 0:
            return f"{column} must be a positive integer, not {row[column]!r}"
    file = image_store / path
    if not file.is_file():
        return "file missing from the image store"
    if hashlib.sha256(file.read_bytes()).hexdigest() != row["sha256"]:
        return "file content differs from its sha256"
    return None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--metadata", type=Path, default=defaults.METADATA)
    parser.add_argument("--image-store", type=Path, default=defaults.IMAGE_STORE)
    parser.add_argument("--db", type=Path, default=defaults.CATALOGUE)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        report = populate(args.metadata, args.image_store, args.db)
    except FileNotFoundError as error:
        print(f"populate: error: {error}", file=sys.stderr)
        return 2
    if "MLFLOW_RUN_ID" in os.environ:
        import mlflow

        with start_run("populate"):
            mlflow.log_params(vars(args))
            mlflow.log_metrics({"inserted": report.inserted, "updated": report.updated,
                                "unchanged": report.unchanged, "rejected": len(report.rejected)})
    print(f"populate: {report.inserted} inserted, {report.updated} updated, {report.unchanged} unchanged, "
          f"{len(report.rejected)} rejected -> {args.db}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
