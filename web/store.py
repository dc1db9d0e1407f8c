"""Where the page reads catalogue images from: the image store named in the page's own configuration.

The catalogue only says *which* file (a key relative to the store); the page decides *where* the
store is (`IMAGE_STORE`), so a tampered catalogue cannot point it at another folder. A store is
anything with `read(key) -> bytes` that raises `NotInStore` for every key it will not serve; the
local folder is the only kind here, `open_store` is where another kind (s3://) plugs in.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path, PurePosixPath
from typing import Protocol

# Far above any catalogue image (extract skips files over 50 MB), small enough to hold in memory.
MAX_FILE_BYTES = 50 * 1024 * 1024
MAX_KEY_CHARS = 1024  # a whole key; each name in it is also held to the file system's 255 bytes
MAX_NAME_BYTES = 255


class NotInStore(LookupError):
    """The store has no servable file under this key; the message says why (for the log only)."""


class ImageStore(Protocol):
    def read(self, key: object) -> bytes: ...


def safe_key(key: object) -> PurePosixPath:
    """The key as a relative path of plain names, or NotInStore: a catalogue row is data, and any
    row that is not a plain relative path (wrong type, NUL, too long, absolute, `..`) is refused
    before the file system sees it."""
    if not isinstance(key, str):
        raise NotInStore(f"the path is a {type(key).__name__}, not text")
    if not key or len(key) > MAX_KEY_CHARS:
        raise NotInStore(f"the path has {len(key)} characters (1..{MAX_KEY_CHARS} allowed)")
    if "\x00" in key or "\\" in key:
        raise NotInStore("the path holds a NUL byte or a backslash")
    path = PurePosixPath(key)
    if path.is_absolute() or any(part in ("..", ".") for part in path.parts):
        raise NotInStore("the path is absolute or has '.' or '..' in it")
    try:
        too_long = any(len(part.encode("utf-8")) > MAX_NAME_BYTES for part in path.parts)
    except UnicodeEncodeError:  # a lone surrogate: no file is named that
        raise NotInStore("the path is not valid Unicode") from None
    if too_long:
        raise NotInStore(f"a name in the path is longer than {MAX_NAME_BYTES} bytes")
    return path


class LocalStore:
    """A folder on this machine. Symbolic links are followed only while they stay inside it."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def read(self, key: object) -> bytes:
        path = self.root / safe_key(key)
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as error:  # missing, a symlink loop, a name the OS refuses
            raise NotInStore(f"the file cannot be found ({type(error).__name__})") from None
        if not real.is_relative_to(self.root):
            raise NotInStore("the path leads outside the image store")
        try:
            # O_NOFOLLOW on the resolved path: a link swapped in after the check is refused, and
            # O_NONBLOCK so that a FIFO placed in the store cannot hang the request.
            fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError as error:
            raise NotInStore(f"the file cannot be opened ({type(error).__name__})") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise NotInStore("the path is not a regular file")
            if info.st_size > MAX_FILE_BYTES:
                raise NotInStore(f"the file is larger than {MAX_FILE_BYTES // 2**20} MB")
            with os.fdopen(fd, "rb", closefd=False) as file:
                return file.read(MAX_FILE_BYTES + 1)
        finally:
            os.close(fd)


class BucketStore:
    """s3://bucket/prefix on an S3-compatible object store (the team layout, docs/team.md), through
    databases.image_store (boto3; endpoint from MLFLOW_S3_ENDPOINT_URL / AWS_ENDPOINT_URL). Keys are
    checked here as for a folder; an unreachable store raises image_store.StoreError (the page: 503)."""

    def __init__(self, url: str):
        from databases.image_store import ObjectStore

        self.bucket = ObjectStore(url)

    def read(self, key: object) -> bytes:
        data = self.bucket.read(safe_key(key).as_posix(), max_bytes=MAX_FILE_BYTES + 1)
        if data is None:
            raise NotInStore("there is no such object in the image store")
        if len(data) > MAX_FILE_BYTES:
            raise NotInStore(f"the file is larger than {MAX_FILE_BYTES // 2**20} MB")
        return data


def open_store(location: str | Path) -> ImageStore:
    """The store at `location`: a folder, or s3://bucket/prefix."""
    text = str(location)
    if text.startswith("s3://"):
        return BucketStore(text)
    if "://" in text:
        raise ValueError(f"IMAGE_STORE {text!r}: a folder or s3://bucket/prefix")
    return LocalStore(text)
