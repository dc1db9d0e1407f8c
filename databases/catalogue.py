"""Data access for the SQLite catalogue. Parametrised SQL only; the schema lives in schema.sql."""
from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

SCHEMA = Path(__file__).with_name("schema.sql")
COLUMNS = ("sha256", "path", "split", "label", "width", "height", "bytes", "source", "attributes")
# Known images (same sha256) are updated only where something differs, so a re-run changes nothing.
UPSERT = """
INSERT INTO images (sha256, path, split, label, width, height, bytes, source, attributes)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (sha256) DO UPDATE SET
    path = excluded.path, split = excluded.split, label = excluded.label, width = excluded.width,
    height = excluded.height, bytes = excluded.bytes, source = excluded.source, attributes = excluded.attributes
WHERE path IS NOT excluded.path OR split IS NOT excluded.split OR label IS NOT excluded.label
    OR width IS NOT excluded.width OR height IS NOT excluded.height OR bytes IS NOT excluded.bytes
    OR source IS NOT excluded.source OR attributes IS NOT excluded.attributes
"""


@dataclass(frozen=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int


def connect(db_path: str | Path, readonly: bool = False) -> sqlite3.Connection:
    """Open the catalogue. Read-only connections never create or lock the file for writing."""
    db_path = Path(db_path)
    if readonly:
        if not db_path.is_file():
            raise FileNotFoundError(f"catalogue not found: {db_path} (run the populate step first)")
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path)
        conn.executescript(SCHEMA.read_text())
    conn.execute("PRAGMA busy_timeout = 5000")
    conn.row_factory = sqlite3.Row
    return conn


def set_store_root(conn: sqlite3.Connection, store_root: Path) -> None:
    conn.execute(
        "INSERT INTO settings (key, value) VALUES ('store_root', ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE value IS NOT excluded.value",
        (str(Path(store_root).resolve()),),
    )


def store_root(conn: sqlite3.Connection) -> Path:
    row = conn.execute("SELECT value FROM settings WHERE key = 'store_root'").fetchone()
    if row is None:
        raise LookupError("the catalogue records no image store root (run the populate step)")
    return Path(row["value"])


def upsert_images(conn: sqlite3.Connection, rows: list[dict]) -> UpsertCounts:
    """Insert new images, update the metadata of known ones (same sha256), leave identical rows alone."""
    before = conn.total_changes
    inserted = updated = 0
    with conn:
        for row in rows:
            values = tuple(_column_value(row, column) for column in COLUMNS)
            known = conn.execute("SELECT 1 FROM images WHERE sha256 = ?", (values[0],)).fetchone()
            conn.execute(UPSERT, values)
            changed = conn.total_changes - before
            before = conn.total_changes
            if changed and known:
                updated += 1
            elif changed:
                inserted += 1
    return UpsertCounts(inserted, updated, len(rows) - inserted - updated)


def _column_value(row: dict, column: str):
    value = row[column]
    if column == "attributes" and not isinstance(value, str):
        value = json.dumps(value or {}, sort_keys=True)
    if column in ("width", "height", "bytes"):
        value = int(value)
    return value


def images(conn: sqlite3.Connection, split: str | None = None) -> pd.DataFrame:
    """All catalogue rows (optionally one split), ordered by id, with absolute file paths in `file`."""
    frame = pd.read_sql_query(
        "SELECT * FROM images WHERE ? IS NULL OR split = ? ORDER BY id", conn, params=(split, split)
    )
    root = store_root(conn)
    frame["file"] = [str(root / p) for p in frame["path"]]
    return frame


def image_file(conn: sqlite3.Connection, image_id: int) -> Path | None:
    """The file of catalogue image `image_id`, or None if the catalogue does not name it."""
    if not 0 < image_id < 2**63:  # ids are positive SQLite integers: a bigger one cannot even be asked
        return None
    row = conn.execute("SELECT path FROM images WHERE id = ?", (image_id,)).fetchone()
    if row is None:
        return None
    root = store_root(conn).resolve()
    file = (root / row["path"]).resolve()
    # A tampered row must not reach outside the image store.
    return file if file.is_relative_to(root) and file.is_file() else None


def content_hash(conn: sqlite3.Connection) -> str:
    """A digest of what the catalogue holds (which images, in which split, with which label)."""
    digest = hashlib.sha256()
    for row in conn.execute("SELECT sha256, split, label FROM images ORDER BY sha256"):
        digest.update(f"{row['sha256']},{row['split']},{row['label']}\n".encode())
    return digest.hexdigest()
