"""The image store: where the pixels live, addressed by keys such as `train/cat/x.jpg`.

Two kinds, one interface:
- a folder (the one-person default, e.g. `data/images`);
- `s3://bucket/prefix` on any S3-compatible object store (AWS S3, MinIO, Ceph, moto's server...).
  The endpoint comes from `MLFLOW_S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL` (unset: AWS itself), the
  credentials from the usual AWS chain (environment, ~/.aws, instance role), as for MLflow's own
  artifacts, so one set of settings serves both.

The catalogue records keys relative to the store; a key never leaves it (no '..', no absolute
path, no symlink out of a folder store).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

HASH_CHUNK = 1 << 20


class StoreError(Exception):
    """The store cannot be reached or used; the message is one line that says what to do."""


def is_object_store(root: str | Path) -> bool:
    return str(root).startswith("s3://")


def safe_key(key: str) -> str | None:
    """The key if it stays inside the store, else None."""
    path = PurePosixPath(key)
    if not key or "\\" in key or "\0" in key or path.is_absolute() or any(part in ("", ".", "..") for part in key.split("/")):
        return None
    return path.as_posix()


class FolderStore:
    """A folder on this machine (or a shared mount)."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def __str__(self) -> str:
        return str(self.root)

    def location(self, key: str) -> str:
        """What readers are given: the file's absolute path."""
        return str(self.root / key)

    def _file(self, key: str) -> Path | None:
        if safe_key(key) is None:
            return None
        try:
            file = (self.root / key).resolve()
            # A symlink inside the store must not reach a file outside it either.
            return file if file.is_relative_to(self.root) and file.is_file() else None
        except OSError:  # a name too long for the file system: no such file
            return None

    def read(self, key: str) -> bytes | None:
        file = self._file(key)
        return file.read_bytes() if file else None

    def sha256(self, key: str) -> str | None:
        file = self._file(key)
        if file is None:
            return None
        with file.open("rb") as handle:  # streamed: a file is never held in memory whole
            return hashlib.file_digest(handle, "sha256").hexdigest()

    def write(self, key: str, data: bytes) -> None:
        """Write under the store's root only: every folder of the key is opened without following a
        link (a symlinked folder in the store is refused, never written through), and the partial
        file is created anew (O_EXCL | O_NOFOLLOW), so a planted `.<name>.partial` link is removed, not followed."""
        *folders, name = _checked(key).split("/")
        self.root.mkdir(parents=True, exist_ok=True)
        folder = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in folders:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, dir_fd=folder)
                try:
                    inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=folder)
                except OSError:  # ELOOP: a link; ENOTDIR: a file
                    raise StoreError(f"cannot write {key} in the image store {self.root}: {part!r} is a link or not a folder") from None
                os.close(folder)
                folder = inner
            partial = f".{name}.partial"
            with contextlib.suppress(FileNotFoundError):  # a killed run's leftover, or a planted link
                os.unlink(partial, dir_fd=folder)
            handle = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644, dir_fd=folder)
            with os.fdopen(handle, "wb") as file:
                file.write(data)
            # A killed run never leaves half a file under the real name; a link there is replaced, not followed.
            os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)
        finally:
            os.close(folder)


class ObjectStore:
    """`s3://bucket/prefix` through boto3: the same calls reach AWS S3, MinIO or moto."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise StoreError(f"not an object store URL: {url} (expected s3://bucket/prefix)")
        self.bucket = parts.netloc
        self.prefix = parts.path.strip("/")
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")

    def __str__(self) -> str:
        return self.url

    def location(self, key: str) -> str:
        return f"{self.url}/{key}"

    def _object(self, key: str) -> str:
        return f"{self.prefix}/{_checked(key)}" if self.prefix else _checked(key)

    def read(self, key: str, max_bytes: int | None = None) -> bytes | None:
        """The object's bytes (at most `max_bytes`, when given), or None if there is no such object."""
        if safe_key(key) is None:
            return None
        body = self._call("get_object", Key=self._object(key))
        return None if body is None else body["Body"].read(max_bytes)

    def sha256(self, key: str) -> str | None:
        if safe_key(key) is None:
            return None
        body = self._call("get_object", Key=self._object(key))
        if body is None:
            return None
        digest = hashlib.sha256()
        for chunk in body["Body"].iter_chunks(HASH_CHUNK):
            digest.update(chunk)
        return digest.hexdigest()

    def keys(self) -> Iterator[str]:
        """Every object under the prefix, as keys relative to it (S3's listing order: by key)."""
        start = f"{self.prefix}/" if self.prefix else ""
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Prefix=start, **token) or {}
            for item in page.get("Contents", []):
                yield item["Key"][len(start) :]
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def write(self, key: str, data: bytes) -> None:
        # One PUT is atomic: readers see the old object or the new one, never half of it.
        self._call("put_object", Key=self._object(key), Body=data)

    def _call(self, operation: str, **kwargs) -> dict | None:
        """One S3 call; None when the object does not exist, StoreError for everything else."""
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError

        try:
            return getattr(_client(), operation)(Bucket=self.bucket, **kwargs)
        except ClientError as error:
            code = error.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404"):
                return None
            if code == "NoSuchBucket":
                raise StoreError(
                    f"the image store {self.url}: bucket {self.bucket!r} does not exist (create it, e.g. `aws s3 mb s3://{self.bucket}`)"
                ) from None
            raise StoreError(f"the image store {self.url} refused {operation}: {code or error}") from None
        except NoCredentialsError:
            raise StoreError(
                f"the image store {self.url}: no AWS credentials (set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile)"
            ) from None
        except EndpointConnectionError:
            raise StoreError(
                f"the image store {self.url} is unreachable at {endpoint() or 'AWS S3'} "
                "(start the object store, or set AWS_ENDPOINT_URL / MLFLOW_S3_ENDPOINT_URL)"
            ) from None
        except BotoCoreError as error:
            raise StoreError(f"the image store {self.url}: {error}") from None


def _checked(key: str) -> str:
    checked = safe_key(key)
    if checked is None:
        raise StoreError(f"key outside the image store: {key!r}")
    return checked


def endpoint() -> str | None:
    """MLflow's variable first (it is what its artifact store uses), then boto3's own."""
    return os.environ.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


_clients: dict[tuple[int, str | None], object] = {}
_clients_lock = threading.Lock()


def _client():
    """One client per process and endpoint: boto3 clients are thread-safe, but not fork-safe."""
    key = (os.getpid(), endpoint())
    with _clients_lock:
        if key not in _clients:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=32)
            _clients[key] = boto3.client("s3", endpoint_url=key[1], config=config)
        return _clients[key]


def open_store(root: str | Path) -> FolderStore | ObjectStore:
    """The store at `root`: a folder path or an s3:// URL."""
    return ObjectStore(str(root)) if is_object_store(root) else FolderStore(root)


@functools.lru_cache(maxsize=64)
def _store_of(root: str) -> FolderStore | ObjectStore:
    return open_store(root)


def read_location(location: str, max_bytes: int | None = None) -> bytes:
    """The bytes behind a location the catalogue hands out (an absolute path or an s3:// URL); of an
    object, at most `max_bytes` when given."""
    if not is_object_store(location):
        return Path(location).read_bytes()
    parts = urlsplit(location)
    data = _store_of(f"s3://{parts.netloc}").read(parts.path.lstrip("/"), max_bytes)
    if data is None:
        raise FileNotFoundError(f"not in the image store: {location}")
    return data


def root_argument(value: str) -> str | Path:
    """argparse type for --image-store: a URL stays as given (Path would fold its '//'), a folder is a Path."""
    return value if is_object_store(value) else Path(value)


def absolute(root: str | Path) -> str | Path:
    """A store root that means the same from any working folder: a URL as given, a folder resolved."""
    return str(root) if is_object_store(root) else Path(root).resolve()
