"""score: a photo collection -> one row per file (label, confidence, probabilities, similar images).

    mlflow run . -e score --env-manager local -P input=photos/ -P output=predictions.parquet
    python -m steps.score --input photos.zip --output predictions.csv [--engine spark]

The input is a folder (walked to any depth), a .zip, a text file listing image paths (one per
line, relative to the list's own folder, or s3:// URLs), or s3://bucket/prefix (read through
databases/image_store.py, so also by a Spark cluster's executors). Every file goes through the
registered pyfunc, the scoring server's own preprocessing and answer, in batches. A file that cannot be read or decoded
is a row with its `error`; it never stops the job. Rows are written as they come to
`<output>.partial/` and the output appears under its final name only when complete, so an
interrupted run (Ctrl-C, kill) continues where it stopped when run again. Files with the same
content are scored once. docs/scoring.md has the columns and the Spark engine.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import shutil
import stat
import sys
import threading
import time
import zipfile
import zlib
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from databases import image_store
from steps import defaults
from steps.tracking import start_run
from team.preflight import one_line_errors, permission_problem

# What the pyfunc decodes (pyfunc/preprocess.py FORMATS); other files in a folder or .zip are
# ignored and counted, so that sidecar files (.xmp, .txt, Thumbs.db) do not fill the table.
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".dib", ".gif"}
MAX_FILE_BYTES = 50 * 1024 * 1024  # far above any photo; keeps a mislabelled video out of memory
READERS = 4  # threads reading and hashing files ahead of the model: I/O, not CPU
# Bytes of files held at once, whatever the files: by the reads ahead of the model, by the batch
# being filled and by the batches the model has not answered yet (a batch ends at batch_size files
# or at BATCH_BYTES). Without them, 40 files of 49 MB (a 9 MB .zip of zeros) were all held at once.
READ_AHEAD_BYTES = 256 * 1024 * 1024
BATCH_BYTES = 128 * 1024 * 1024
IN_FLIGHT_BYTES = 512 * 1024 * 1024
GONE = "gone from the input: scored by an earlier run, no longer in the input"  # the error of such a row
CSV_TEXT_COLUMNS = ("path", "sha256", "label", "error")
# What a spreadsheet takes as the start of a formula (OWASP's CSV injection list), and the quote
# that neutralises it (a leading quote is doubled, so reading the CSV back is exact).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")
# What reading one file or one .zip entry can raise when that file is damaged or unreadable.
UNREADABLE = (OSError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile, zlib.error)
OPTIONAL_OUTPUTS = {"unfamiliar": pa.bool_(), "familiarity": pa.float64()}  # newer models only
ENGINES = ("local", "spark")


class InputError(ValueError):
    """The input or output cannot be used as given; the message says why, in one line."""


class ReadError(Exception):
    """One file cannot be read; the message becomes that row's `error`."""


@dataclass(frozen=True)
class Entry:
    """One file to score."""

    path: str  # as written in the output: relative to the input (or as listed), '/'-separated
    file: str  # the file on disk, or the .zip that holds it
    member: str | None = None  # its name inside the .zip


@dataclass
class Inputs:
    entries: list[Entry]
    ignored: Counter = field(default_factory=Counter)  # file suffix -> files that are not images


# ---------------------------------------------------------------------------------------------
# The input: folder, .zip or list of paths


def list_inputs(source: Path | str) -> Inputs:
    """Every file to score in `source`, in a stable order (hidden files and folders are skipped, other
    files that are not images counted). Raises InputError."""
    if image_store.is_object_store(source):
        return _bucket(str(source))
    source = Path(source)
    if source.is_dir():
        return _folder(source)
    if not source.exists():
        raise InputError(f"input not found: {source}")
    if not source.is_file():  # opening a FIFO to see what it holds would wait for a writer forever
        raise InputError(f"input {source} is not a folder nor a regular file (a FIFO, socket or device cannot be scored)")
    if source.suffix.lower() in IMAGE_SUFFIXES:
        return Inputs([Entry(source.name, str(source.resolve()))])
    if source.suffix.lower() == ".zip" or zipfile.is_zipfile(source):
        return _zip(source)
    return _listing(source)


def _folder(root: Path) -> Inputs:
    inputs = Inputs([])
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))  # walk in a stable order
        for name in sorted(files):
            if name.startswith("."):  # .DS_Store, ._* resource forks: not photos, not worth a row
                continue
            relative = Path(folder, name).relative_to(root).as_posix()
            if _is_image_name(name):
                inputs.entries.append(Entry(relative, str(Path(folder, name).absolute())))
            else:
                inputs.ignored[_suffix(name)] += 1
    return inputs


def _bucket(url: str) -> Inputs:
    """The objects under s3://bucket/prefix, as a folder's files: paths relative to the prefix. The
    executors of a cluster read them through the same store (databases/image_store.py)."""
    try:
        store = image_store.ObjectStore(url)
    except image_store.StoreError as error:
        raise InputError(str(error)) from None
    inputs = Inputs([])
    for key in sorted(store.keys()):
        if any(part.startswith(".") for part in key.split("/")):
            continue
        if _is_image_name(key):
            inputs.entries.append(Entry(key, store.location(key)))
        else:
            inputs.ignored[_suffix(key)] += 1
    if not inputs.entries and not inputs.ignored:
        raise InputError(f"input not found: no objects under {url}")
    return inputs


def _zip(source: Path) -> Inputs:
    try:
        with zipfile.ZipFile(source) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
    except (zipfile.BadZipFile, OSError) as error:
        raise InputError(f"cannot open {source} as a .zip: {error}") from None
    inputs = Inputs([])
    for name in sorted(names):
        if _outside(name):  # never skipped silently: an image is an error row (_read_member), anything else is counted
            if _is_image_name(name):
                inputs.entries.append(Entry(name, str(source.resolve()), name))
            else:
                inputs.ignored[_suffix(name)] += 1
            continue
        if any(part.startswith(".") or part == "__MACOSX" for part in name.split("/")):
            continue  # what macOS adds to an archive, not photos
        if _is_image_name(name):
            inputs.entries.append(Entry(name, str(source.resolve()), name))
        else:
            inputs.ignored[_suffix(name)] += 1
    return inputs


def _listing(source: Path) -> Inputs:
    """A text file of paths: each listed path is a row (whatever its suffix: it was asked for)."""
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (UnicodeDecodeError, OSError):
        raise InputError(f"input {source} is neither a folder, a .zip, nor a text file listing image paths") from None
    entries, seen = [], set()
    for line in lines:
        path = line.strip()
        if not path or path.startswith("#") or path in seen:
            continue
        seen.add(path)
        if image_store.is_object_store(path):  # an object in the team's bucket, read through the store
            entries.append(Entry(path, path))
            continue
        entries.append(Entry(path, _listed_file(source.parent.absolute(), path)))
    return Inputs(entries)


def _listed_file(folder: Path, path: str) -> str:
    """The file a line of a list names. A line that cannot name one stays as written, so that
    read_entry makes it an error row: a NUL byte, or `~nosuchuser/` (expanduser raises)."""
    if "\0" in path:
        return path
    try:
        return str(folder / Path(path).expanduser())
    except RuntimeError:
        return str(folder / path)


def _outside(name: str) -> bool:
    """A .zip member name that would lead outside the archive's folder ('../x.jpg', '/x.jpg')."""
    return name.startswith("/") or "\\" in name or ".." in name.split("/")


def _is_image_name(name: str) -> bool:
    base = name.rsplit("/", 1)[-1]
    return not base.startswith(".") and Path(base).suffix.lower() in IMAGE_SUFFIXES


def _suffix(name: str) -> str:
    base = name.rsplit("/", 1)[-1]
    return Path(base).suffix.lower() or ("(hidden)" if base.startswith(".") else "(none)")


_zips = threading.local()  # one open ZipFile per .zip per thread: reading one handle from several threads is not safe


def read_entry(entry: Entry) -> bytes:
    """The file's bytes. Raises ReadError (with the reason) for anything that is not a readable file."""
    if entry.member is not None:
        return _read_member(entry)
    if image_store.is_object_store(entry.file):
        return _read_object(entry)
    try:
        info = os.stat(entry.file)  # follows links: a dangling or looping link fails here
        if not stat.S_ISREG(info.st_mode):
            kind = "a folder" if stat.S_ISDIR(info.st_mode) else "not a regular file (FIFO, socket or device)"
            raise ReadError(f"cannot read: {kind}")
        if info.st_size > MAX_FILE_BYTES:
            raise _too_large(info.st_size)
        with open(entry.file, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as error:
        raise ReadError(f"cannot read: {error.strerror or error}") from None
    except ValueError:  # os.stat's "embedded null byte"
        raise ReadError("cannot read: the path holds a NUL byte") from None
    if len(data) > MAX_FILE_BYTES:  # grown since the stat
        raise _too_large(len(data))
    return data


def _read_member(entry: Entry) -> bytes:
    if _outside(entry.member):
        raise ReadError("cannot read from the .zip: its name leads outside the archive")
    archives: dict[str, zipfile.ZipFile] = _zips.__dict__.setdefault("open", {})
    try:
        archive = archives.get(entry.file) or archives.setdefault(entry.file, zipfile.ZipFile(entry.file))
        info = archive.getinfo(entry.member)
        if info.file_size > MAX_FILE_BYTES:
            raise _too_large(info.file_size)
        # One bounded read, never archive.read(): that decompresses the whole member in one call
        # (1 GiB for a member whose header says 1,000 bytes) before checking it against the header.
        with archive.open(info) as member:
            data = member.read(MAX_FILE_BYTES + 1)
    except (KeyError, *UNREADABLE) as error:
        raise ReadError(f"cannot read from the .zip: {error}") from None
    if len(data) > MAX_FILE_BYTES:
        raise _too_large(len(data))
    return data


def _read_object(entry: Entry) -> bytes:
    """An s3:// object. A store that cannot be reached raises StoreError: that stops the job (in one
    line) instead of turning every row into the same error."""
    try:
        data = image_store.read_location(entry.file, max_bytes=MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ReadError("cannot read: no such object in the store") from None
    if len(data) > MAX_FILE_BYTES:
        raise ReadError(f"file too large: over {MAX_FILE_BYTES // 2**20} MB (limit {MAX_FILE_BYTES // 2**20} MB)")
    return data


def _too_large(size: int) -> ReadError:
    return ReadError(f"file too large: {size / 2**20:.0f} MB (limit {MAX_FILE_BYTES // 2**20} MB)")


@dataclass(frozen=True)
class Read:
    entry: Entry
    sha256: str | None
    data: bytes | None
    error: str | None


def read_hashed(entry: Entry) -> Read:
    try:
        data = read_entry(entry)
    except ReadError as error:
        return Read(entry, None, None, str(error))
    return Read(entry, hashlib.sha256(data).hexdigest(), data, None)


# ---------------------------------------------------------------------------------------------
# The output's columns, from the model's own output schema


@dataclass(frozen=True)
class Columns:
    labels: tuple[str, ...]  # the model's classes, in its own order
    optional: tuple[str, ...] = ()  # unfamiliar, familiarity: when this model answers them

    @classmethod
    def of(cls, signature) -> Columns:
        """Read the class names and optional outputs from the model's output schema."""
        schema = signature.outputs if signature is not None else None
        specs = {spec.name: spec for spec in schema.inputs} if schema is not None else {}
        probabilities = specs.get("probabilities")
        if probabilities is None or not hasattr(probabilities.type, "properties"):
            raise InputError("the model's signature has no 'probabilities' output: is it an `animal` model?")
        labels = tuple(prop.name for prop in probabilities.type.properties)
        return cls(labels, tuple(name for name in OPTIONAL_OUTPUTS if name in specs))

    @property
    def probability_columns(self) -> list[str]:
        return [f"p_{label}" for label in self.labels]

    @property
    def answer_columns(self) -> list[str]:
        """The columns that come from the model (all but path and sha256)."""
        return ["label", "confidence", *self.probability_columns, "uncertain", *self.optional, "similar_ids", "error"]

    @property
    def names(self) -> list[str]:
        return ["path", "sha256", *self.answer_columns]

    def schema(self) -> pa.Schema:
        types = {
            "path": pa.string(),
            "sha256": pa.string(),
            "label": pa.string(),
            "confidence": pa.float64(),
            "uncertain": pa.bool_(),
            "similar_ids": pa.list_(pa.int64()),
            "error": pa.string(),
            **{name: pa.float64() for name in self.probability_columns},
            **OPTIONAL_OUTPUTS,
        }
        return pa.schema([(name, types[name]) for name in self.names])

    def answer(self, row: dict) -> dict:
        """One row of the model's output as this table's columns (nested values flattened)."""
        probabilities = row.get("probabilities") or {}
        answer = {
            "label": row.get("label"),
            "confidence": _number(row.get("confidence")),
            **{f"p_{label}": _number(probabilities.get(label)) for label in self.labels},
            "uncertain": _flag(row.get("uncertain")),
            "similar_ids": [int(item["id"]) for item in (row.get("similar") or [])],
            "error": row.get("error"),
        }
        if "unfamiliar" in self.optional:
            answer["unfamiliar"] = _flag(row.get("unfamiliar"))
        if "familiarity" in self.optional:
            answer["familiarity"] = _number(row.get("familiarity"))
        return answer

    def failed(self, error: str) -> dict:
        return {**dict.fromkeys(self.answer_columns), "similar_ids": [], "error": error}


def _number(value) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _flag(value) -> bool | None:
    return None if value is None or pd.isna(value) else bool(value)


# ---------------------------------------------------------------------------------------------
# Where rows go: parts as they come, the output when complete


class Store:
    """`<output>.partial/part-*.parquet` while scoring (each written whole, under a temporary name
    first), then the output, written to a temporary file and renamed over the final name."""

    def __init__(self, output: Path, columns: Columns, model_id: str):
        if output.suffix.lower() not in (".parquet", ".csv"):
            raise InputError(f"output must end with .parquet or .csv: {output}")
        self.output, self.columns, self.model_id = output, columns, model_id
        self.partial = output.with_name(output.name + ".partial")
        self._next_part = 0

    def previous(self) -> pd.DataFrame:
        """Rows already scored: the finished output (if any) and the parts of an interrupted run."""
        frames = []
        if self.output.exists():
            frames.append(self._read_output())
        if self.partial.is_dir():
            try:
                self._check_manifest()
                parts = sorted(self.partial.glob("part-*.parquet"))
                frames += [pq.read_table(part).to_pandas() for part in parts]
                self._next_part = 1 + max((int(p.stem.split("-")[1]) for p in parts), default=-1)
            except InputError:
                raise
            except (ValueError, OSError, pa.ArrowException) as error:  # a manifest or part that score did not write
                reason = str(error)[:200]
                raise InputError(
                    f"{self.partial} holds a file that score did not write ({reason}): delete the folder to start over"
                ) from None
        if not frames:
            return pd.DataFrame(columns=self.columns.names)
        # The newest row of a path wins: a file changed since the output was written is scored again.
        return pd.concat(frames, ignore_index=True).drop_duplicates("path", keep="last")

    def gone(self, path: str) -> dict:
        """The row of a file no longer in the input: it says so, with no answer that no longer describes a file."""
        return {"path": path, "sha256": None, **self.columns.failed(GONE)}

    def has_parts(self) -> bool:
        return self.partial.is_dir() and any(self.partial.glob("part-*.parquet"))

    def write_part(self, rows: list[dict]) -> None:
        if not self.partial.is_dir():
            self.partial.mkdir(parents=True)
        manifest = self.partial / "manifest.json"
        if not manifest.exists():
            _replace(manifest, lambda tmp: tmp.write_text(json.dumps(self._manifest())))
        target = self.partial / f"part-{self._next_part:06d}.parquet"
        table = pa.Table.from_pylist(rows, schema=self.columns.schema())
        _replace(target, lambda tmp: pq.write_table(table, tmp))
        self._next_part += 1

    def finish(self, order: list[str]) -> pd.DataFrame:
        """Write the whole table (input order; rows of files no longer in the input last, their answer
        replaced by the GONE error) and remove the parts. Returns the table."""
        table = self.previous()
        position = {path: i for i, path in enumerate(order)}
        rank = table["path"].map(position).fillna(len(order)).to_numpy()
        table = table.iloc[rank.argsort(kind="stable")].reset_index(drop=True)
        table = table[self.columns.names]
        gone = ~table["path"].isin(position)
        if gone.any():
            records = table.to_dict("records")
            rows = [self.gone(row["path"]) if out else row for row, out in zip(records, gone, strict=True)]
            table = pd.DataFrame(rows, columns=self.columns.names)
        if self.output.suffix.lower() == ".csv":
            _replace(self.output, lambda tmp: _to_csv(table, tmp), sync=True)
        else:
            arrow = pa.Table.from_pandas(table, schema=self.columns.schema(), preserve_index=False)
            arrow = arrow.replace_schema_metadata({"animal-faces.model": self.model_id})
            _replace(self.output, lambda tmp: pq.write_table(arrow, tmp), sync=True)
        if self.partial.is_dir():
            shutil.rmtree(self.partial)
        return table

    def _manifest(self) -> dict:
        return {"model": self.model_id, "columns": self.columns.names}

    def _check_manifest(self) -> None:
        manifest = self.partial / "manifest.json"
        if manifest.exists() and json.loads(manifest.read_text()) != self._manifest():
            raise InputError(
                f"{self.partial} was started with another model or other columns: run with the same model_uri, or delete it to start over"
            )

    def _read_output(self) -> pd.DataFrame:
        try:
            if self.output.suffix.lower() == ".csv":
                table = _from_csv(self.output)
            else:
                arrow = pq.read_table(self.output)
        except (ValueError, OSError, pa.ArrowException) as error:  # damaged after check_output's look at its header
            raise InputError(f"cannot read the output {self.output} ({str(error)[:200]}): move it away or write another output") from None
        if self.output.suffix.lower() != ".csv":
            model = (arrow.schema.metadata or {}).get(b"animal-faces.model", b"").decode()
            if model and model != self.model_id:
                raise InputError(
                    f"{self.output} was scored by another model ({model}); write to a new output to score with {self.model_id}"
                )
            table = arrow.to_pandas()
        if list(table.columns) != self.columns.names:
            raise InputError(f"{self.output} has other columns than this model's output; write to a new output")
        return table


def _replace(target: Path, write: Callable[[Path], object], sync: bool = False) -> None:
    """Write through a temporary file in the same folder, then rename: the target is never half-written."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(temporary)
        if sync:
            with open(temporary, "rb+") as handle:
                os.fsync(handle.fileno())
        os.replace(temporary, target)
    finally:
        temporary.unlink(missing_ok=True)


def _to_csv(table: pd.DataFrame, path: Path) -> None:
    table = table.copy()
    table["similar_ids"] = [json.dumps([int(i) for i in ids]) if ids is not None else "[]" for ids in table.similar_ids]
    for name in CSV_TEXT_COLUMNS:  # a file named '=HYPERLINK(...).jpg' must stay text in a spreadsheet
        table[name] = [_neutralised(value) for value in table[name]]
    # CRLF, as RFC 4180 has it: the writer then quotes a cell holding a lone CR (a file name may),
    # which readers would otherwise take for the end of the row.
    table.to_csv(path, index=False, lineterminator="\r\n")


def _neutralised(value: str | None) -> str | None:
    return "'" + value if isinstance(value, str) and value.startswith(FORMULA_STARTS) else value


def _restored(value: str) -> str:
    return value[1:] if value.startswith("'") else value


def _from_csv(path: Path) -> pd.DataFrame:
    flags = {"True": True, "False": False}
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    for name in table.columns:
        values = table[name]
        if name == "similar_ids":
            table[name] = [json.loads(v) if v else [] for v in values]
        elif name in ("uncertain", "unfamiliar"):
            table[name] = [flags.get(v) for v in values]
        elif name == "path":
            table[name] = [_restored(v) for v in values]
        elif name in ("sha256", "label", "error"):
            table[name] = [_restored(v) or None for v in values]
        else:
            table[name] = [float(v) if v else None for v in values]
    return table


# ---------------------------------------------------------------------------------------------
# The local engine: readers ahead of the model, the model on every core


def score_local(
    model, entries: list[Entry], columns: Columns, batch_size: int, known: dict[str, dict], workers: int | None = None
) -> Iterator[list[dict]]:
    """Rows for `entries`, one list per batch, in order.

    Reader threads read and hash files ahead; each batch's new contents (by sha256: a content is
    scored once, `known` holds earlier answers) go to the pyfunc on one of `workers` threads, so
    decoding (Pillow releases the GIL) and the forward pass run on every core at once. At most
    `workers + 1` batches are in flight; nothing is kept per file but its answer.
    """
    workers = workers or os.cpu_count() or 1
    answers = dict(known)
    pending: set[str] = set()
    in_flight: deque[tuple[list[Read], list[str], Future]] = deque()
    readers = ThreadPoolExecutor(READERS, thread_name_prefix="score-read")
    scorers = ThreadPoolExecutor(workers, thread_name_prefix="score-model")
    held: deque[int] = deque()  # bytes sent to the model, per batch in flight
    try:
        for batch in _batched(_read_ahead(readers, entries, 2 * batch_size), batch_size):
            new: dict[str, bytes] = {}
            for read in batch:
                if read.sha256 and read.sha256 not in answers and read.sha256 not in pending:
                    new.setdefault(read.sha256, read.data)
            pending.update(new)
            future = scorers.submit(predict, model, list(new.values()), columns)
            # Keep the batch without its bytes: only the new contents' bytes go to the model.
            in_flight.append(([Read(r.entry, r.sha256, None, r.error) for r in batch], list(new), future))
            held.append(sum(map(len, new.values())))
            del batch  # its bytes: the model's call holds those it needs, counted in `held`
            while len(in_flight) > workers or (len(in_flight) > 1 and sum(held) > IN_FLIGHT_BYTES):
                held.popleft()
                yield _finish_batch(in_flight.popleft(), answers, pending, columns)
        while in_flight:
            yield _finish_batch(in_flight.popleft(), answers, pending, columns)
    finally:
        readers.shutdown(wait=False, cancel_futures=True)
        scorers.shutdown(wait=False, cancel_futures=True)


def predict(model, images: list[bytes], columns: Columns) -> list[dict]:
    """The pyfunc's answers for these images. If the model fails on the whole batch, each image
    is tried alone, so one file that breaks it is an error row and not a lost batch."""
    if not images:
        return []
    try:
        frame = model.predict(pd.DataFrame({"image": images}))
        return [columns.answer(row) for row in frame.to_dict("records")]
    except Exception as error:  # any failure of the model becomes rows, never a stopped job
        if len(images) == 1:
            return [columns.failed(f"the model failed on this image: {str(error).splitlines()[0][:300]}")]
        return [answer for image in images for answer in predict(model, [image], columns)]


def _finish_batch(item: tuple[list[Read], list[str], Future], answers: dict[str, dict], pending: set[str], columns: Columns) -> list[dict]:
    batch, shas, future = item
    answers.update(zip(shas, future.result(), strict=True))
    pending.difference_update(shas)
    return [{"path": r.entry.path, "sha256": r.sha256, **(answers[r.sha256] if r.sha256 else columns.failed(r.error))} for r in batch]


def _read_ahead(pool: ThreadPoolExecutor, entries: Iterable[Entry], depth: int, max_bytes: int | None = None) -> Iterator[Read]:
    """read_hashed(entry) for each entry, in order, with up to `depth` reads ahead holding at most
    `max_bytes` (READ_AHEAD_BYTES): a read counts as MAX_FILE_BYTES (what it may hold) until it is
    done, then as its size; a new read starts only while one more MAX_FILE_BYTES fits."""
    max_bytes = READ_AHEAD_BYTES if max_bytes is None else max_bytes
    remaining = iter(entries)
    queue: deque[Future] = deque()
    lock = threading.Lock()
    held = [0]  # bytes the queue may hold; updated by the readers' callbacks and here

    def change(by: int) -> None:
        with lock:
            held[0] += by

    def refill() -> None:
        while len(queue) < depth and (not queue or held[0] + MAX_FILE_BYTES <= max_bytes):
            entry = next(remaining, None)
            if entry is None:
                return
            change(MAX_FILE_BYTES)
            future = pool.submit(read_hashed, entry)
            future.add_done_callback(lambda done: change(_size(done) - MAX_FILE_BYTES))
            queue.append(future)

    refill()
    while queue:
        read = queue.popleft().result()
        change(-len(read.data or b""))
        refill()
        yield read


def _size(future: Future) -> int:
    return 0 if future.cancelled() or future.exception() else len(future.result().data or b"")


def _batched(reads: Iterable[Read], size: int) -> Iterator[list[Read]]:
    """Lists of `size` reads, or fewer when their bytes reach BATCH_BYTES."""
    batch: list[Read] = []
    held = 0
    for read in reads:
        batch.append(read)
        held += len(read.data or b"")
        if len(batch) == size or held >= BATCH_BYTES:
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# Progress, summary, contact sheet


class Progress:
    """A tqdm bar (images/s, time left) on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, total: int, interactive: bool | None = None, every: float = 10.0):
        self.total, self.done, self.every = total, 0, every
        self.start = self._last = time.monotonic()
        interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar = None
        if interactive:
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="img", desc="scoring", dynamic_ncols=True)

    def update(self, count: int) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
            return
        now = time.monotonic()
        if now - self._last >= self.every or self.done == self.total:
            self._last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate else float("nan")
            print(
                f"score: {self.done:,}/{self.total:,} files ({100 * self.done / max(self.total, 1):.0f}%), "
                f"{rate:,.0f} images/s, about {left:,.0f} s left",
                flush=True,
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


@dataclass
class Summary:
    files: int  # rows in the output
    scored_now: int  # files scored by this run
    seconds: float
    labels: dict[str, int]
    uncertain: int
    unfamiliar: int | None  # None: the model does not answer it
    errors: int
    error_kinds: dict[str, int]
    duplicates: int  # files whose content another file already had (scored once)
    ignored: dict[str, int]  # suffix -> files in the input that are not images

    @property
    def images_per_s(self) -> float:
        return self.scored_now / self.seconds if self.seconds > 0 else 0.0

    def lines(self, output: Path) -> list[str]:
        labels = " · ".join(f"{label} {count:,}" for label, count in self.labels.items())
        counts = [labels, f"uncertain {self.uncertain:,}", f"errors {self.errors:,}"]
        if self.unfamiliar is not None:
            counts.insert(2, f"unfamiliar {self.unfamiliar:,}")
        lines = [
            f"score: {self.files:,} files -> {output} ({self.scored_now:,} scored now in {self.seconds:.1f} s, "
            f"{self.images_per_s:,.0f} images/s)",
            "  " + " · ".join(counts),
        ]
        if self.duplicates:
            repeat = "file repeats" if self.duplicates == 1 else "files repeat"
            lines.append(f"  {self.duplicates:,} {repeat} another file's content (scored once)")
        if self.error_kinds:
            lines.append("  errors: " + ", ".join(f"{kind} {n:,}" for kind, n in self.error_kinds.items()))
        if self.ignored:
            lines.append(
                f"  ignored {sum(self.ignored.values()):,} files that are not images: "
                + ", ".join(f"{suffix} {n:,}" for suffix, n in self.ignored.items())
            )
        return lines


def summarize(table: pd.DataFrame, columns: Columns, scored_now: int, seconds: float, ignored: Counter) -> Summary:
    answered = table[table.error.isna()]
    errors = table.error.dropna()
    kinds = Counter(str(message).split(":")[0] for message in errors)
    hashed = table.sha256.dropna()
    return Summary(
        files=len(table),
        scored_now=scored_now,
        seconds=seconds,
        labels={label: int((answered.label == label).sum()) for label in columns.labels},
        uncertain=int((answered.uncertain == True).sum()),  # noqa: E712 - nullable column
        unfamiliar=int((answered.unfamiliar == True).sum()) if "unfamiliar" in columns.optional else None,  # noqa: E712
        errors=len(errors),
        error_kinds=dict(kinds.most_common()),
        duplicates=int(hashed.duplicated().sum()),
        ignored=dict(ignored.most_common()),
    )


def contact_sheet(table: pd.DataFrame, entries: dict[str, Entry], per_label: int = 6, least: int = 6, thumb: int = 128):
    """A PNG-able PIL image: the most confident images of each predicted label, one row each, and
    a last row of the least confident ones, captioned with label and confidence. None if nothing
    was answered."""
    from PIL import Image, ImageDraw

    from pyfunc.preprocess import ImageError, load_image

    answered = table[table.error.isna() & table.path.isin(list(entries))]
    if answered.empty:
        return None
    rows = [(f"{label}: most confident", group.nlargest(per_label, "confidence")) for label, group in answered.groupby("label", sort=True)]
    rows.append(("least confident", answered.nsmallest(least, "confidence")))
    title, caption = 18, 30
    width = max(per_label, least) * thumb
    sheet = Image.new("RGB", (width, len(rows) * (title + thumb + caption)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (heading, chosen) in enumerate(rows):
        top = r * (title + thumb + caption)
        draw.text((4, top + 2), heading, fill="black")
        for c, item in enumerate(chosen.itertuples()):
            left = c * thumb
            try:
                picture = Image.fromarray(load_image(read_entry(entries[item.path]), thumb - 4))
                sheet.paste(picture, (left + 2, top + title))
            except (ReadError, ImageError):
                continue  # changed since it was scored: leave the cell blank
            draw.text((left + 2, top + title + thumb), f"{item.label} {item.confidence:.2f}", fill="black")
            draw.text((left + 2, top + title + thumb + 13), _short(item.path, thumb // 7), fill="gray")
    return sheet


def _short(text: str, length: int) -> str:
    return text if len(text) <= length else "…" + text[-(length - 1) :]


# ---------------------------------------------------------------------------------------------
# The job


@dataclass(frozen=True)
class Result:
    summary: Summary
    table: pd.DataFrame
    entries: dict[str, Entry]
    model_id: str


def score(
    source: Path | str,
    output: Path,
    model_uri: str = defaults.SCORE_MODEL_URI,
    engine: str = defaults.SCORE_ENGINE,
    spark_master: str = defaults.SPARK_MASTER,
    batch_size: int = defaults.SCORE_BATCH_SIZE,
    interactive: bool | None = None,
) -> Result:
    """Score every file of `source` into `output` (see the module docstring), holding the output's
    lock (`<output>.lock`) throughout. Raises InputError."""
    if output.suffix.lower() not in (".parquet", ".csv"):
        raise InputError(f"output must end with .parquet or .csv: {output}")
    if engine not in ENGINES:
        raise InputError(f"engine must be one of {', '.join(ENGINES)}: {engine}")
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1: {batch_size}")
    if engine == "spark":
        from steps import score_spark

        score_spark.check()
    with output_lock(output):
        return _score(source, output, model_uri, engine, spark_master, batch_size, interactive)


def _score(source: Path, output: Path, model_uri: str, engine: str, spark_master: str, batch_size: int, interactive: bool | None) -> Result:
    import mlflow
    from mlflow.exceptions import MlflowException

    check_output(output)  # before the input is listed or the model loaded: a bad output is a one-line error at once
    inputs = list_inputs(source)
    try:
        info = mlflow.models.get_model_info(model_uri)
    except (MlflowException, OSError) as error:
        raise InputError(f"no model at {model_uri} ({str(error).splitlines()[0][:200]}); `make run` trains and promotes one") from None
    columns = Columns.of(info.signature)
    model_id = info.model_uuid or model_uri
    store = Store(output, columns, model_id)
    previous = store.previous()
    done = set(previous.path)
    changed = _changed([entry for entry in inputs.entries if entry.path in done], previous)
    todo = [entry for entry in inputs.entries if entry.path not in done or entry.path in changed]
    gone = set(previous.path[previous.error != GONE]) - {entry.path for entry in inputs.entries}
    seconds = 0.0
    if todo:
        kept = len(inputs.entries) - len(todo)
        print(
            f"score: {len(todo):,} files to score ({kept:,} already scored, {len(changed):,} of them again: changed since) "
            f"with {model_uri} on the {engine} engine",
            flush=True,
        )
        batches = _engine(engine, model_uri, todo, columns, batch_size, spark_master, previous)
        # The clock starts once the model is loaded (local) or the session is up (Spark): it measures
        # scoring, which is what grows with the collection.
        started = time.monotonic()
        progress = Progress(len(todo), interactive)
        try:
            for rows in batches:
                store.write_part(rows)
                progress.update(len(rows))
        finally:
            progress.close()
        seconds = time.monotonic() - started
    if todo or gone or store.has_parts() or not output.exists():
        table = store.finish([entry.path for entry in inputs.entries])
    else:
        table = previous  # a finished output and nothing new: leave the file as it is
        print(f"score: all {len(inputs.entries):,} files are already in {output}; nothing to do", flush=True)
    summary = summarize(table, columns, len(todo), seconds, inputs.ignored)
    return Result(summary, table, {entry.path: entry for entry in inputs.entries}, model_id)


def _changed(entries: list[Entry], previous: pd.DataFrame) -> set[str]:
    """Paths among `entries` (all with a row in `previous`) whose row no longer describes the file: its
    content (sha256) is not the one scored, or the row says it was gone. Every file is hashed again:
    reading is cheap next to the model, and a size or a date can stay the same when the content does not."""
    old = {row.path: (row.sha256 if isinstance(row.sha256, str) else None, row.error) for row in previous.itertuples()}
    with ThreadPoolExecutor(READERS, thread_name_prefix="score-check") as pool:
        return {
            read.entry.path
            for read in _read_ahead(pool, entries, 4 * READERS)
            if read.sha256 != old[read.entry.path][0] or old[read.entry.path][1] == GONE
        }


@contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `<output>.lock` (fcntl.flock) while scoring into `output`: a second `score` on the same
    output is refused at once instead of writing the same parts. The system releases the lock when
    the process ends, however it ends (kill -9 included); the file is removed on the way out."""
    lock = output.with_name(output.name + ".lock")
    while True:
        try:
            output.parent.mkdir(parents=True, exist_ok=True)
            handle = open(lock, "a+")  # noqa: SIM115 - held until the end of the job
        except OSError as error:  # the first write: an output folder that cannot be written fails here, before any work
            raise InputError(f"cannot write the output {output}: {error.strerror or error}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read(20).strip() or "?"
            handle.close()
            raise InputError(f"another score (process {holder}) is writing {output}: wait for it to end, or write another output") from None
        try:  # the holder before us may have removed the file between our open and our lock: lock the new one
            same = os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        lock.unlink(missing_ok=True)
        handle.close()


def check_output(output: Path) -> None:
    """An output that exists must be one `score` wrote (its parts a folder), else InputError: found
    now, not after the model has loaded or a whole collection has been scored."""
    partial = output.with_name(output.name + ".partial")
    if partial.exists() and not partial.is_dir():
        raise InputError(f"{partial} is in the way (not the folder of an interrupted run): move it away or write another output")
    if not output.exists():
        return
    if not output.is_file():
        raise InputError(f"the output {output} exists and is not a file: write another output")
    if output.suffix.lower() == ".csv":
        try:
            with open(output, encoding="utf-8") as handle:
                ours = handle.readline(1000).startswith("path,sha256,")
        except (OSError, UnicodeDecodeError):
            ours = False
        if not ours:
            raise InputError(f"the output {output} exists and is not a table written by score: move it away or write another output")
        return
    try:
        pq.read_schema(output)
    except (pa.ArrowException, OSError) as error:
        reason = str(error)[:200]
        raise InputError(f"the output {output} exists and is not a Parquet file ({reason}): move it away or write another output") from None


def _engine(
    engine: str, model_uri: str, todo: list[Entry], columns: Columns, batch_size: int, spark_master: str, previous: pd.DataFrame
) -> Iterator[list[dict]]:
    """The engine's batches of rows, with its start-up (Spark session, model) done before returning."""
    import mlflow

    from pyfunc.model import THREADS_VARIABLE

    # Both engines make one model call per core at once (the local engine's threads, Spark's Python
    # workers): each runs the network on its own thread; a pool of every core for each call made
    # 3 to 4 busy threads on 2 cores and was slower under load (docs/performance.md).
    os.environ.setdefault(THREADS_VARIABLE, "1")
    if engine == "spark":
        from steps.score_spark import score_spark, spark_session

        return score_spark(spark_session(spark_master), model_uri, todo, columns, batch_size)
    model = mlflow.pyfunc.load_model(model_uri)
    answered = previous[previous.sha256.notna() & previous.error.isna()]
    known = {row["sha256"]: {name: row[name] for name in columns.answer_columns} for row in answered.to_dict("records")}
    for answer in known.values():
        answer["similar_ids"] = [int(i) for i in answer["similar_ids"]]
    return score_local(model, todo, columns, batch_size, known)


def log_run(args: argparse.Namespace, result: Result, output: Path) -> None:
    """Record the job in MLflow: parameters, counts, throughput, the output and a contact sheet."""
    import tempfile

    import mlflow

    summary = result.summary
    with start_run("score") as run:
        # `mlflow run` has logged its own -P values already; MLflow refuses to log one twice.
        params = {**{k: str(v) for k, v in vars(args).items()}, "model_id": result.model_id}
        mlflow.log_params({k: v for k, v in params.items() if k not in run.data.params})
        mlflow.log_metrics(
            {
                "files": summary.files,
                "scored_now": summary.scored_now,
                "errors": summary.errors,
                "uncertain": summary.uncertain,
                "duplicates": summary.duplicates,
                "ignored": sum(summary.ignored.values()),
                "seconds": summary.seconds,
                "images_per_s": summary.images_per_s,
                **{f"label_{label}": n for label, n in summary.labels.items()},
                **({"unfamiliar": summary.unfamiliar} if summary.unfamiliar is not None else {}),
            }
        )
        mlflow.log_dict({"summary": summary.lines(output), "error_kinds": summary.error_kinds, "ignored": summary.ignored}, "summary.json")
        mlflow.log_artifact(str(output))
        sheet = contact_sheet(result.table, result.entries)
        if sheet is not None:
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / "contact_sheet.png"
                sheet.save(path)
                mlflow.log_artifact(str(path))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--input", type=image_store.root_argument, required=True, help="a folder, a .zip, a text file listing paths, or s3://bucket/prefix"
    )
    parser.add_argument("--output", type=Path, required=True, help="a .parquet or .csv file")
    parser.add_argument("--model-uri", default=defaults.SCORE_MODEL_URI)
    parser.add_argument("--engine", choices=ENGINES, default=defaults.SCORE_ENGINE)
    parser.add_argument(
        "--spark-master", default=defaults.SPARK_MASTER, help="spark engine: local[*], spark://host:7077, ... (ignored under spark-submit)"
    )
    parser.add_argument("--batch-size", type=int, default=defaults.SCORE_BATCH_SIZE, help="images per model call")
    return parser


@one_line_errors("score")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = score(args.input, args.output, args.model_uri, args.engine, args.spark_master, args.batch_size)
    except InputError as error:
        print(f"score: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"\nscore: interrupted; what was scored is kept in {args.output}.partial: run the same command again to continue",
            file=sys.stderr,
        )
        return 130
    print("\n".join(result.summary.lines(args.output)), flush=True)
    try:
        log_run(args, result, args.output)
    except Exception as error:
        # A reader (team layout) may score but not log a run: the scores are written, say what is missing.
        problem = permission_problem(error)
        if problem is None:
            raise
        print(f"score: the job was not recorded in MLflow: {problem}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
