-- The catalogue: one row per image, paths and metadata only (pixels stay in the image store).
PRAGMA journal_mode = WAL;  -- readers (the web page) keep reading while populate writes

CREATE TABLE IF NOT EXISTS settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS images (
    id         INTEGER PRIMARY KEY,
    sha256     TEXT    NOT NULL UNIQUE CHECK (length(sha256) = 64),
    path       TEXT    NOT NULL,            -- relative to the image store root
    split      TEXT    NOT NULL CHECK (split IN ('train', 'val')),
    label      TEXT    NOT NULL,
    width      INTEGER NOT NULL CHECK (width > 0),
    height     INTEGER NOT NULL CHECK (height > 0),
    bytes      INTEGER NOT NULL CHECK (bytes > 0),
    source     TEXT    NOT NULL,
    attributes TEXT    NOT NULL DEFAULT '{}', -- JSON object, e.g. {"fur_color": "grey"}
    added_at   TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%SZ', 'now'))
);

CREATE INDEX IF NOT EXISTS images_split_label ON images (split, label);
