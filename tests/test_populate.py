"""populate and the catalogue: idempotent upsert, rejected rows, store root, read-only access."""

from __future__ import annotations

import csv
import hashlib
import random
import sqlite3

import pytest

from databases import catalogue
from steps.extract import extract
from steps.populate import populate


@pytest.fixture
def extracted(tmp_path):
    extract("synthetic", tmp_path / "images", tmp_path / "meta.csv", images_per_class=4, seed=5)
    return tmp_path / "images", tmp_path / "meta.csv", tmp_path / "catalogue.db"


def rows_of(db) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT * FROM images ORDER BY id").fetchall()


def rewrite_csv(path, change) -> None:
    with path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = change(rows)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_populate_twice_changes_nothing(extracted):
    image_store, metadata, db = extracted
    first = populate(metadata, image_store, db)
    before = rows_of(db)
    second = populate(metadata, image_store, db)
    assert (first.inserted, first.unchanged) == (12, 0)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 12)
    assert rows_of(db) == before  # added_at included: nothing was rewritten


def test_a_new_file_adds_one_row(extracted, tmp_path):
    image_store, metadata, db = extracted
    populate(metadata, image_store, db)
    extract("synthetic", image_store, metadata, images_per_class=5, seed=5)  # one more image per class
    report = populate(metadata, image_store, db)
    assert (report.inserted, report.unchanged) == (3, 12)
    assert len(rows_of(db)) == 15


def test_changed_metadata_updates_the_row(extracted):
    image_store, metadata, db = extracted
    populate(metadata, image_store, db)
    rewrite_csv(metadata, lambda rows: [{**rows[0], "attributes": '{"fur_color": "green"}'}] + rows[1:])
    report = populate(metadata, image_store, db)
    assert (report.inserted, report.updated, report.unchanged) == (0, 1, 11)
    assert len(rows_of(db)) == 12


@pytest.mark.parametrize(
    "break_row, problem",
    [
        (lambda r, store: (store / r["path"]).unlink(), "missing from the image store"),
        (lambda r, store: (store / r["path"]).write_bytes(b"changed"), "differs from its sha256"),
        (lambda r, store: r.update(path="../../etc/passwd"), "relative to the image store"),
        (lambda r, store: r.update(path="/etc/passwd"), "relative to the image store"),
        (lambda r, store: r.update(split="test"), "unknown split"),
        (lambda r, store: r.update(sha256=""), "missing sha256"),
    ],
)
def test_bad_rows_are_reported_not_inserted(extracted, break_row, problem):
    image_store, metadata, db = extracted

    def change(rows):
        break_row(rows[0], image_store)
        return rows

    rewrite_csv(metadata, change)
    report = populate(metadata, image_store, db)
    assert report.inserted == 11 and len(report.rejected) == 1 and problem in report.rejected[0]
    assert len(rows_of(db)) == 11


def test_sql_metacharacters_are_data(extracted):
    image_store, metadata, db = extracted
    # In `source`, free text (a label outside the known set is refused: test_reliability_batch.py).
    rewrite_csv(metadata, lambda rows: [{**rows[0], "source": "synthetic'; DROP TABLE images;--"}] + rows[1:])
    populate(metadata, image_store, db)
    sources = {row[8] for row in rows_of(db)}
    assert "synthetic'; DROP TABLE images;--" in sources and len(rows_of(db)) == 12


def test_catalogue_records_store_root_and_hash(extracted):
    image_store, metadata, db = extracted
    populate(metadata, image_store, db)
    conn = catalogue.connect(db, readonly=True)
    assert catalogue.store_root(conn) == image_store.resolve()
    frame = catalogue.images(conn, split="val")
    assert set(frame.split) == {"val"} and all(map(lambda f: f.endswith(".jpg"), frame.file))
    first_hash = catalogue.content_hash(conn)
    assert catalogue.image_file(conn, int(frame.id.iloc[0])).read_bytes()
    assert catalogue.image_file(conn, 10**9) is None
    with pytest.raises(sqlite3.OperationalError):  # read-only really is read-only
        conn.execute("DELETE FROM images")
    conn.close()
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    extract("synthetic", image_store, metadata, images_per_class=5, seed=5)
    populate(metadata, image_store, db)
    conn = catalogue.connect(db, readonly=True)
    assert catalogue.content_hash(conn) != first_hash


def test_image_file_refuses_paths_outside_the_store(extracted):
    image_store, metadata, db = extracted
    populate(metadata, image_store, db)
    with sqlite3.connect(db) as conn:  # a tampered row
        conn.execute("UPDATE images SET path = '../meta.csv' WHERE id = 1")
    conn = catalogue.connect(db, readonly=True)
    assert catalogue.image_file(conn, 1) is None
    assert catalogue.image_file(conn, 2) is not None


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the extract step"):
        populate(tmp_path / "none.csv", tmp_path, tmp_path / "db")
    with pytest.raises(FileNotFoundError, match="run the populate step"):
        catalogue.connect(tmp_path / "none.db", readonly=True)


# --- at AFHQ's scale: streamed hashing, batched upserts, progress -----------------------------------


@pytest.mark.parametrize("size", [0, 1, 1 << 16, 3 * (1 << 20) + 7])
def test_streamed_hash_is_the_sha256_of_the_whole_file(tmp_path, size):
    from databases.image_store import FolderStore

    data = random.Random(size).randbytes(size)
    (tmp_path / "f").write_bytes(data)
    assert FolderStore(tmp_path).sha256("f") == hashlib.sha256(data).hexdigest()


def test_batches_change_nothing_and_stay_idempotent(extracted, tmp_path, monkeypatch):
    from steps import populate as module

    image_store, metadata, db = extracted
    populate(metadata, image_store, db)  # in one batch
    monkeypatch.setattr(module, "BATCH_ROWS", 5)  # 12 rows: batches of 5, 5 and 2
    first = populate(metadata, image_store, tmp_path / "batched.db")
    second = populate(metadata, image_store, tmp_path / "batched.db")
    assert (first.inserted, first.unchanged) == (12, 0)
    assert (second.inserted, second.updated, second.unchanged) == (0, 0, 12)
    columns = "sha256, path, split, label, width, height, bytes, source, attributes"
    with sqlite3.connect(db) as one, sqlite3.connect(tmp_path / "batched.db") as batched:
        query = f"SELECT {columns} FROM images ORDER BY id"
        assert one.execute(query).fetchall() == batched.execute(query).fetchall()


def test_progress_is_plain_lines_when_not_a_terminal(extracted, capsys):
    image_store, metadata, db = extracted
    capsys.readouterr()
    populate(metadata, image_store, db)
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and all(line.startswith("populate: ") for line in lines)
    assert lines[-1].startswith("populate: 12/12 row (100%)")
