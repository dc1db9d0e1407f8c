"""Data access for the catalogue. Parametrised SQL only.

Two databases, one schema, one set of functions:
- a SQLite file (the one-person default, e.g. `databases/animal.db`; schema in schema.sql), reached
  with the standard library's sqlite3, exactly as before;
- PostgreSQL, given as a URL (`postgresql://user:password@host:5432/animal`; the team layout;
  schema in schema.postgresql.sql), reached through SQLAlchemy Core and psycopg.
`connect` returns a sqlite3 connection or a SQLAlchemy connection; every function here takes either.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from sqlalchemy.exc import SQLAlchemyError

from databases import image_store

SCHEMA = Path(__file__).with_name("schema.sql")
POSTGRES_SCHEMA = Path(__file__).with_name("schema.postgresql.sql")
COLUMNS = ("sha256", "path", "split", "label", "width", "height", "bytes", "source", "attributes")
URL_SCHEMES = ("postgresql://", "postgresql+psycopg://", "postgres://")
SCHEMA_LOCK = 0x616E696D  # any constant: the advisory lock that serialises creating the tables
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
# The same on PostgreSQL; a row comes back only when something was written, and xmax = 0 marks an
# insert (an update leaves the old row version's xmax set).
POSTGRES_UPSERT = """
INSERT INTO images (sha256, path, split, label, width, height, bytes, source, attributes)
VALUES (:sha256, :path, :split, :label, :width, :height, :bytes, :source, :attributes)
ON CONFLICT (sha256) DO UPDATE SET
    path = excluded.path, split = excluded.split, label = excluded.label, width = excluded.width,
    height = excluded.height, bytes = excluded.bytes, source = excluded.source, attributes = excluded.attributes
WHERE (images.path, images.split, images.label, images.width, images.height, images.bytes, images.source,
       images.attributes)
    IS DISTINCT FROM (excluded.path, excluded.split, excluded.label, excluded.width, excluded.height,
                      excluded.bytes, excluded.source, excluded.attributes)
RETURNING (xmax = 0) AS inserted
"""
SET_SETTING = {
    "sqlite": "INSERT INTO settings (key, value) VALUES (:key, :value) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value WHERE value IS NOT excluded.value",
    "postgresql": "INSERT INTO settings (key, value) VALUES (:key, :value) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value "
    "WHERE settings.value IS DISTINCT FROM excluded.value",
}

# The same order on both: PostgreSQL would otherwise sort by its locale.
CONTENT_HASH_QUERY = {
    "sqlite": "SELECT sha256, split, label FROM images ORDER BY sha256",
    "postgresql": 'SELECT sha256, split, label FROM images ORDER BY sha256 COLLATE "C"',
}


class CatalogueError(Exception):
    """The catalogue cannot be used; the message is one line that says what to do."""


class CatalogueMissing(CatalogueError, FileNotFoundError):
    """There is no catalogue yet (populate creates it)."""


class CatalogueUnreachable(CatalogueError, ConnectionError):
    """The catalogue's database server does not answer."""


# What reading the catalogue can raise when the database is missing, down or damaged, on either kind.
DATABASE_ERRORS = (CatalogueError, sqlite3.Error, SQLAlchemyError)


@dataclass(frozen=True)
class UpsertCounts:
    inserted: int
    updated: int
    unchanged: int


def is_url(target: str | Path) -> bool:
    """True for a database URL (PostgreSQL), False for a SQLite file path."""
    return str(target).startswith(URL_SCHEMES)


def location(value: str) -> str | Path:
    """argparse type for --db: a URL stays as given (Path would fold its '//'), a file is a Path."""
    return value if is_url(value) else Path(value)


def describe(target: str | Path) -> str:
    """The catalogue's name for messages and logs: never the password of a URL."""
    if not is_url(target):
        return str(target)
    from sqlalchemy.engine import make_url

    return make_url(_driver_url(str(target))).set(drivername="postgresql").render_as_string(hide_password=True)


def connect(target: str | Path, readonly: bool = False, timeout: float | None = None):
    """Open the catalogue. Read-only connections never create it or write to it. With `timeout`
    (seconds; the page's per-request connections), no statement runs longer: PostgreSQL's
    statement_timeout, and on SQLite the busy timeout plus an interrupt once the connection is that
    old, so a locked or pathologically slow catalogue is an error, not a request that hangs."""
    if is_url(target):
        return _connect_postgres(str(target), readonly, timeout)
    db_path = Path(target)
    if readonly:
        if not db_path.is_file():
            raise CatalogueMissing(f"catalogue not found: {db_path} (run the populate step first)")
        conn = sqlite3.connect(f"{db_path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
    else:
        db_path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(db_path)
        conn.executescript(SCHEMA.read_text())
    conn.execute(f"PRAGMA busy_timeout = {5000 if timeout is None else int(timeout * 1000)}")
    if timeout is not None:
        deadline = time.monotonic() + timeout
        # Called every 10,000 SQLite VM steps; a non-zero answer interrupts the statement.
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
    conn.row_factory = sqlite3.Row
    return conn


def _driver_url(url: str) -> str:
    """SQLAlchemy's plain postgresql:// means psycopg2; this project installs psycopg (3)."""
    for scheme in ("postgresql://", "postgres://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url.removeprefix(scheme)
    return url


_engines: dict[tuple[int, str, bool, float | None], Any] = {}
_engines_lock = threading.Lock()


def _engine(url: str, readonly: bool, timeout: float | None = None):
    """One connection pool per process, URL, mode and time limit (pools must not cross a fork)."""
    from sqlalchemy import create_engine

    key = (os.getpid(), url, readonly, timeout)
    with _engines_lock:
        if key not in _engines:
            # libpq's connect_timeout is whole seconds (2 at least).
            options = {"connect_timeout": 5 if timeout is None else max(2, math.ceil(timeout)), "application_name": "animal-faces"}
            settings = ["-c default_transaction_read_only=on"] if readonly else []
            if timeout is not None:
                settings.append(f"-c statement_timeout={int(timeout * 1000)}")
            if settings:
                options["options"] = " ".join(settings)
            _engines[key] = create_engine(_driver_url(url), connect_args=options, pool_pre_ping=True, pool_size=4, max_overflow=8)
        return _engines[key]


def _connect_postgres(url: str, readonly: bool, timeout: float | None = None):
    from sqlalchemy import exc, text

    try:
        conn = _engine(url, readonly, timeout).connect()
    except exc.OperationalError as error:
        raise CatalogueUnreachable(
            f"the catalogue database {describe(url)} is unreachable ({_reason(error)}): start it "
            "(`make team-up` on this machine) or check --db / ANIMAL_DB"
        ) from None
    except exc.ArgumentError as error:
        raise CatalogueError(f"not a database URL: {describe(url)} ({error})") from None
    try:
        if readonly:
            found = conn.execute(text("SELECT to_regclass('images') IS NOT NULL")).scalar()
            conn.commit()
            if not found:
                raise CatalogueMissing(f"catalogue not found: {describe(url)} has no images table (run the populate step first)")
        else:
            with conn.begin():
                conn.execute(text("SELECT pg_advisory_xact_lock(:lock)"), {"lock": SCHEMA_LOCK})
                for statement in _statements(POSTGRES_SCHEMA.read_text()):
                    conn.exec_driver_sql(statement)
    except exc.ProgrammingError as error:
        conn.close()
        if getattr(error.orig, "sqlstate", None) != "42501":  # insufficient_privilege
            raise
        # A role that may only read (the team layout's reader) cannot even ensure the schema: say who.
        raise CatalogueError(
            f"permission denied: PostgreSQL role {conn.engine.url.username} may not write the catalogue {describe(url)} "
            f"({_reason(error)}): writing (extract, populate) needs the writer role (`python -m team env --role writer`)"
        ) from None
    except BaseException:
        conn.close()
        raise
    return conn


def _reason(error: Exception) -> str:
    """The first line of the driver's message, without SQLAlchemy's background links."""
    message = str(getattr(error, "orig", None) or error).strip().splitlines()
    return message[0].rstrip(".") if message else type(error).__name__


def _statements(script: str) -> list[str]:
    """The statements of our own schema file (no ';' inside its statements or comments)."""
    lines = [line.split("--")[0] for line in script.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def _postgres(conn) -> bool:
    return not isinstance(conn, sqlite3.Connection)


def _rows(conn, statement: str, params: dict | None = None) -> list:
    """Rows as mappings (row["column"]) on either database; a read never leaves a transaction open."""
    if not _postgres(conn):
        return conn.execute(statement, params or {}).fetchall()
    from sqlalchemy import text

    started = not conn.in_transaction()
    rows = conn.execute(text(statement), params or {}).mappings().all()
    if started:
        conn.commit()
    return rows


@contextmanager
def transaction(conn) -> Iterator[None]:
    """A block whose writes land together or not at all (committed at its end, rolled back on error)."""
    if _postgres(conn):
        if conn.in_transaction():
            conn.commit()  # a read's transaction, nothing to keep
        with conn.begin():
            yield
        return
    with conn:
        if not conn.in_transaction:
            conn.execute("BEGIN")  # now, so that the writes inside join it rather than commit alone
        yield


def _write(conn) -> AbstractContextManager:
    """Within a caller's `transaction` block, join it; otherwise one transaction of our own."""
    if not _postgres(conn):
        return nullcontext() if conn.in_transaction else conn
    return nullcontext() if conn.in_transaction() else conn.begin()


def set_store_root(conn, store_root: str | Path) -> None:
    """Record where the images are: a folder (stored as its absolute path) or an s3:// URL."""
    value = str(image_store.open_store(store_root))
    with _write(conn):
        if _postgres(conn):
            from sqlalchemy import text

            conn.execute(text(SET_SETTING["postgresql"]), {"key": "store_root", "value": value})
        else:
            conn.execute(SET_SETTING["sqlite"], {"key": "store_root", "value": value})


def store_root(conn) -> Path | str:
    """The image store the catalogue's paths are relative to: a folder (Path) or an s3:// URL (str)."""
    rows = _rows(conn, "SELECT value FROM settings WHERE key = 'store_root'")
    if not rows:
        raise LookupError("the catalogue records no image store root (run the populate step)")
    return image_store.root_argument(rows[0]["value"])


def upsert_images(conn, rows: list[dict]) -> UpsertCounts:
    """Insert new images, update the metadata of known ones (same sha256), leave identical rows alone."""
    if _postgres(conn):
        return _upsert_postgres(conn, rows)
    before = conn.total_changes
    inserted = updated = 0
    with _write(conn):
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


def _upsert_postgres(conn, rows: list[dict]) -> UpsertCounts:
    from sqlalchemy import text

    statement = text(POSTGRES_UPSERT)
    inserted = updated = 0
    # Rows in sha256 order: two writers then lock rows in the same order and cannot deadlock.
    ordered = sorted(({c: _column_value(row, c) for c in COLUMNS} for row in rows), key=lambda r: r["sha256"])
    with _write(conn):
        for values in ordered:
            written = conn.execute(statement, values).first()
            if written is not None and written.inserted:
                inserted += 1
            elif written is not None:
                updated += 1
    return UpsertCounts(inserted, updated, len(rows) - inserted - updated)


def _column_value(row: dict, column: str):
    value = row[column]
    if column == "attributes" and not isinstance(value, str):
        value = json.dumps(value or {}, sort_keys=True)
    if column in ("width", "height", "bytes"):
        value = int(value)
    return value


def images(conn, split: str | None = None) -> pd.DataFrame:
    """All catalogue rows (optionally one split), ordered by id, with each image's location in `file`:
    an absolute path for a folder store, an s3:// URL for an object store (image_store.read_location)."""
    if _postgres(conn):
        from sqlalchemy import text

        started = not conn.in_transaction()
        result = conn.execute(
            text("SELECT * FROM images WHERE CAST(:split AS TEXT) IS NULL OR split = :split ORDER BY id"), {"split": split}
        )
        frame = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
        if started:
            conn.commit()
    else:
        frame = pd.read_sql_query("SELECT * FROM images WHERE ? IS NULL OR split = ? ORDER BY id", conn, params=(split, split))
    store = image_store.open_store(store_root(conn))
    frame["file"] = [store.location(p) for p in frame["path"]]
    return frame


def image_key(conn, image_id: int) -> str | None:
    """The store key (relative path) of catalogue image `image_id`, or None if the catalogue does not
    name it or its recorded path would leave the store."""
    path = image_path(conn, image_id)  # ids are positive 64-bit integers: a bigger one cannot even be asked
    return None if path is None else image_store.safe_key(path)


def image_path(conn, image_id: int) -> str | None:
    """The path the catalogue records for `image_id`, as stored (unchecked), or None if no such row."""
    if not 0 < image_id < 2**63:
        return None
    rows = _rows(conn, "SELECT path FROM images WHERE id = :id", {"id": image_id})
    return rows[0]["path"] if rows else None


def image_file(conn, image_id: int) -> Path | None:
    """The file of catalogue image `image_id` in a folder store, or None if the catalogue does not name it."""
    key = image_key(conn, image_id)
    root = store_root(conn) if key is not None else None
    if key is None or not isinstance(root, Path):
        return None
    root = root.resolve()
    file = (root / key).resolve()
    # A tampered row must not reach outside the image store.
    return file if file.is_relative_to(root) and file.is_file() else None


def image_bytes(conn, image_id: int, store: str | Path | None = None) -> bytes | None:
    """The bytes of catalogue image `image_id`, read from `store` (default: the store the catalogue
    records), or None if the catalogue does not name it or the store does not have it."""
    key = image_key(conn, image_id)
    if key is None:
        return None
    return image_store.open_store(store if store is not None else store_root(conn)).read(key)


def content_hash(conn) -> str:
    """A digest of what the catalogue holds (which images, in which split, with which label); the
    same on SQLite and PostgreSQL for the same rows."""
    digest = hashlib.sha256()
    for row in _rows(conn, CONTENT_HASH_QUERY["postgresql" if _postgres(conn) else "sqlite"]):
        digest.update(f"{row['sha256']},{row['split']},{row['label']}\n".encode())
    return digest.hexdigest()
