"""Object storage for job outputs and source images: a local folder or an S3 bucket.

Keys are relative POSIX paths (``jobs/<id>/shards/000000.tar``). Writes are atomic for readers: a
reader sees the old object or the new one, never a partial one. ``list`` and ``delete_prefix`` use
plain string prefixes, as S3 does: end a prefix with ``/`` to scope it to one folder.
"""

from __future__ import annotations

import builtins
import itertools
import mimetypes
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, BinaryIO, cast
from urllib.parse import unquote, urlsplit

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from service.settings import Settings, normalize_location

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from service.uploads import Upload
else:
    S3Client = Any

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageSource",
    "is_within",
    "ListingTooLarge",
    "LocalStorage",
    "NotFound",
    "S3Storage",
    "SourceLocation",
    "Storage",
    "StorageError",
    "open_image_source",
    "parse_source_uri",
    "s3_client",
    "s3_client_config",
    "storage_from_url",
]

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp"})
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the SigV4 limit
_TMP_PREFIX = ".dpig-tmp-"
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
# a URL scheme, as opposed to a local path (one letter would be a Windows drive)
_SCHEME_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):")
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})


class StorageError(Exception):
    """A storage operation failed (after the backend's own retries)."""


class NotFound(StorageError):
    """The key does not exist."""


class ListingTooLarge(ValueError):
    """A source listing passed its cap (``ImageSource.keys``)."""


def _check_path(value: str, *, what: str, allow_empty: bool, allow_trailing_slash: bool) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, got {type(value).__name__}")
    if value == "":
        if allow_empty:
            return value
        raise ValueError(f"{what} must not be empty")
    if value.startswith("/"):
        raise ValueError(f"{what} {value!r} must be relative, not absolute")
    if "\\" in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a backslash or NUL")
    body = value[:-1] if allow_trailing_slash and value.endswith("/") else value
    for part in body.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{what} {value!r} has an empty, '.' or '..' segment")
    return value


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative POSIX key, else raise ``ValueError``."""
    return _check_path(key, what="key", allow_empty=False, allow_trailing_slash=False)


def check_prefix(prefix: str, *, allow_empty: bool = True) -> str:
    """Return ``prefix`` if it is a safe key prefix (it may end with ``/``); else ``ValueError``."""
    return _check_path(prefix, what="prefix", allow_empty=allow_empty, allow_trailing_slash=True)


def _guess_type(key: str, content_type: str | None) -> str:
    return content_type or mimetypes.guess_type(key)[0] or "application/octet-stream"


class Storage(ABC):
    """A flat key → bytes store rooted at one URL (``file:///dir`` or ``s3://bucket/prefix``)."""

    @property
    @abstractmethod
    def root_url(self) -> str:
        """The canonical URL of the root; ``url(key)`` is this plus ``/key``."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write ``data`` to ``key``, replacing any object there atomically."""

    @abstractmethod
    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file to ``key`` (multipart on S3 for large files)."""

    @abstractmethod
    def open_upload(self, key: str, content_type: str | None = None) -> Upload:
        """An object written piece by piece (``service.uploads.Upload``): ``write`` its bytes,
        then ``finish`` to publish it atomically, or ``abort``. Nothing is at ``key`` before
        ``finish``."""

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """Read a whole object; raises ``NotFound`` when it is missing."""

    @abstractmethod
    def open_read(self, key: str) -> BinaryIO:
        """A binary stream over an object (use as a context manager); ``NotFound`` if missing."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """Whether an object is stored at ``key``."""

    @abstractmethod
    def list(self, prefix: str = "") -> list[str]:
        """Every key starting with ``prefix``, sorted."""

    @abstractmethod
    def iter_keys(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        """Keys starting with ``prefix`` and sorting after ``start_after``, in sorted order and
        lazily: a caller that stops early never lists the rest."""

    def page(self, prefix: str, limit: int, start_after: str = "") -> builtins.list[str]:
        """At most ``limit`` sorted keys under ``prefix`` after ``start_after`` (a page)."""
        return list(itertools.islice(self.iter_keys(prefix, start_after), limit))

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Delete every key starting with ``prefix`` (must not be empty); returns how many."""

    @abstractmethod
    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        """A URL that lets its holder GET ``key`` without credentials until it expires."""

    def url(self, key: str) -> str:
        """The canonical URI of ``key`` (``s3://bucket/prefix/key`` or ``file:///dir/key``)."""
        return f"{self.root_url}/{check_key(key)}"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.root_url!r})"


class LocalStorage(Storage):
    """Objects as files under ``root``; created lazily on the first write."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root)
        if not path.is_absolute():
            raise ValueError(f"LocalStorage root {str(root)!r} must be an absolute path")
        self.root = path

    @property
    def root_url(self) -> str:
        return self.root.as_uri()

    def url(self, key: str) -> str:
        return self._path(key).as_uri()

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*check_key(key).split("/"))

    def open_upload(self, key: str, content_type: str | None = None) -> Upload:
        from service.uploads import LocalUpload  # uploads imports this module

        return LocalUpload(self._path(key), self.url(key))

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        with self.open_upload(key) as upload:
            upload.write(data)
            upload.finish()

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        with self.open_upload(key) as upload:
            try:
                with open(path, "rb") as source:
                    while piece := source.read(1 << 20):
                        upload.write(piece)
            except OSError as exc:
                raise StorageError(f"cannot write {self.url(key)}: {exc}") from exc
            upload.finish()

    def open_read(self, key: str) -> BinaryIO:
        path = self._path(key)
        try:
            return open(path, "rb")
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise NotFound(f"no object at {self.url(key)}") from exc
        except OSError as exc:
            raise StorageError(f"cannot read {self.url(key)}: {exc}") from exc

    def get_bytes(self, key: str) -> bytes:
        with self.open_read(key) as handle:
            return handle.read()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def _iter_keys(self, prefix: str) -> Iterator[str]:
        # walk only the deepest folder the prefix names, then filter by the string prefix
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        if not start.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(start):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if name.startswith(_TMP_PREFIX):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def list(self, prefix: str = "") -> list[str]:
        return sorted(self._iter_keys(check_prefix(prefix)))

    def iter_keys(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        check_prefix(prefix)
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        start = self.root.joinpath(*folder.split("/")) if folder else self.root
        for key in self._walk_sorted(start, folder):
            if key.startswith(prefix) and key > start_after:
                yield key
            elif key > prefix and not key.startswith(prefix) and key > start_after:
                return  # sorted: nothing further can match

    def _walk_sorted(self, folder: Path, rel: str) -> Iterator[str]:
        """Keys under ``folder`` in byte order: a folder ``x`` sorts as ``x/`` (after ``x.png``)."""
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return
        named = sorted(
            (entry.name + ("/" if entry.is_dir(follow_symlinks=False) else ""), entry)
            for entry in entries
            if not entry.name.startswith(_TMP_PREFIX)
        )
        for name, entry in named:
            key = f"{rel}/{name}" if rel else name
            if name.endswith("/"):
                yield from self._walk_sorted(Path(entry.path), key.rstrip("/"))
            elif entry.is_file():
                yield key

    def delete_prefix(self, prefix: str) -> int:
        keys = self.list(check_prefix(prefix, allow_empty=False))
        folders: set[Path] = set()
        for key in keys:
            path = self._path(key)
            path.unlink(missing_ok=True)
            folders.update(p for p in path.parents if p != self.root and self.root in p.parents)
        if prefix.endswith("/") and (whole := self._path(prefix.rstrip("/"))).is_dir():
            # a killed writer's unfinished upload (`LocalUpload`) would keep the folder alive
            for stale in whole.rglob(f"{_TMP_PREFIX}*"):
                stale.unlink(missing_ok=True)
                folders.update(p for p in stale.parents if whole == p or whole in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            try:
                folder.rmdir()
            except OSError:  # not empty: other keys live there
                pass
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        # a local file needs no signature; the URL is only meaningful on this machine
        return self.url(key)


def s3_client_config(settings: Settings) -> Config:
    """The botocore config: SigV4, retries with exponential backoff, bounded timeouts."""
    return Config(
        signature_version="s3v4",
        # total_max_attempts counts the first call; botocore's max_attempts would count retries only
        retries={"mode": settings.s3_retry_mode, "total_max_attempts": settings.s3_max_attempts},
        connect_timeout=10,
        read_timeout=60,
        # path-style addressing works with every S3 clone (SeaweedFS, MinIO, Ceph) on any host
        s3={"addressing_style": "path" if settings.s3_endpoint_url else "auto"},
    )


def s3_client(settings: Settings) -> S3Client:
    """A boto3 S3 client from settings; unset credentials fall back to boto3's normal chain."""
    secret = settings.aws_secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        aws_access_key_id=settings.aws_access_key_id,
        aws_secret_access_key=secret.get_secret_value() if secret is not None else None,
        config=s3_client_config(settings),
    )


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    """Objects in ``s3://bucket/prefix``; PUTs are atomic, large files go up in parts
    (``open_upload``: parts of ``part_bytes``, from ``upload_threads`` background threads)."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        client: S3Client,
        transfer_config: TransferConfig | None = None,
        part_bytes: int = 8 * 1024 * 1024,  # boto3's own multipart chunk size
        upload_threads: int = 4,
    ) -> None:
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"invalid S3 bucket name {bucket!r}")
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        self.bucket = bucket
        self.prefix = prefix
        self.client = client
        self.transfer_config = transfer_config or TransferConfig()
        self.part_bytes = part_bytes
        self.upload_threads = upload_threads

    @classmethod
    def from_settings(cls, bucket: str, prefix: str, settings: Settings) -> S3Storage:
        return cls(bucket, prefix, client=s3_client(settings))

    @property
    def root_url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _full_prefix(self, prefix: str) -> str:
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def _fail(self, action: str, key: str, exc: Exception) -> StorageError:
        if isinstance(exc, ClientError) and _error_code(exc) in _NOT_FOUND_CODES:
            return NotFound(f"no object at {self.url(key)}")
        return StorageError(f"cannot {action} {self.url(key)}: {exc}")

    def put_bytes(self, key: str, data: bytes, content_type: str | None = None) -> None:
        try:
            self.client.put_object(
                Bucket=self.bucket,
                Key=self._key(key),
                Body=data,
                ContentType=_guess_type(key, content_type),
            )
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("write", key, exc) from exc

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        if not os.path.isfile(path):
            raise StorageError(f"cannot upload {self.url(key)}: no file at {os.fspath(path)!r}")
        try:
            self.client.upload_file(
                os.fspath(path),
                self.bucket,
                self._key(key),
                ExtraArgs={"ContentType": _guess_type(key, None)},
                Config=self.transfer_config,
            )
        except (ClientError, BotoCoreError, S3UploadFailedError) as exc:
            raise self._fail("upload", key, exc) from exc

    def open_upload(self, key: str, content_type: str | None = None) -> Upload:
        from service.uploads import S3Upload  # uploads imports this module

        return S3Upload(self, key, _guess_type(key, content_type))

    def open_read(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("read", key, exc) from exc
        return cast(BinaryIO, response["Body"])

    def get_bytes(self, key: str) -> bytes:
        body = self.open_read(key)
        try:
            with body:
                return body.read()
        except (ClientError, BotoCoreError) as exc:
            raise self._fail("read", key, exc) from exc

    def exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _error_code(exc) in _NOT_FOUND_CODES:
                return False
            raise self._fail("stat", key, exc) from exc
        except BotoCoreError as exc:
            raise self._fail("stat", key, exc) from exc
        return True

    def _iter_full_keys(self, prefix: str) -> Iterator[str]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._full_prefix(prefix)):
                for obj in page.get("Contents", []):
                    yield obj["Key"]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.root_url}/{prefix}: {exc}") from exc

    def iter_keys(self, prefix: str = "", start_after: str = "") -> Iterator[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        paginator = self.client.get_paginator("list_objects_v2")
        full = self._full_prefix(check_prefix(prefix))
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full}
        if start_after:
            args["StartAfter"] = self._full_prefix(start_after)
        try:
            for page in paginator.paginate(**args):
                for obj in page.get("Contents", []):
                    if not obj["Key"].endswith("/"):
                        yield obj["Key"][strip:]
        except (ClientError, BotoCoreError) as exc:
            raise StorageError(f"cannot list {self.root_url}/{prefix}: {exc}") from exc

    def list(self, prefix: str = "") -> list[str]:
        strip = len(self.prefix) + 1 if self.prefix else 0
        # "folder/" markers (made by consoles and some tools) are not objects to read
        keys = self._iter_full_keys(check_prefix(prefix))
        return sorted(key[strip:] for key in keys if not key.endswith("/"))

    def delete_prefix(self, prefix: str) -> int:
        keys = sorted(self._iter_full_keys(check_prefix(prefix, allow_empty=False)))
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            except (ClientError, BotoCoreError) as exc:
                raise StorageError(f"cannot delete {self.root_url}/{prefix}: {exc}") from exc
            if errors := response.get("Errors"):
                first = errors[0]
                raise StorageError(
                    f"cannot delete {len(errors)} objects under {self.root_url}/{prefix}, "
                    f"e.g. {first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )
        return len(keys)

    def presigned_url(self, key: str, expires_s: int = 3600) -> str:
        if not 1 <= expires_s <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires_s must be in [1, {MAX_PRESIGN_SECONDS}], got {expires_s}")
        url = self.client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=expires_s,
        )
        return str(url)


def storage_from_url(url: str, settings: Settings) -> Storage:
    """The backend for ``file:///abs/dir`` or ``s3://bucket/prefix`` (S3 options from settings)."""
    if "://" not in url:
        raise ValueError(f"storage URL {url!r} must be file:///absolute/path or s3://bucket/prefix")
    parts = urlsplit(normalize_location(url, field="storage URL"))
    if parts.scheme == "file":
        return LocalStorage(unquote(parts.path))
    return S3Storage.from_settings(parts.netloc, parts.path.strip("/"), settings)


@dataclass(frozen=True)
class SourceLocation:
    """An allowed source folder: backend root ``storage_url`` and the folder ``prefix`` in it."""

    uri: str
    storage_url: str
    prefix: str


def is_within(child: str, parent: str) -> bool:
    """Whether location ``child`` is ``parent`` or lies under it (whole path segments)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def parse_source_uri(
    uri: str, allowed_prefixes: Sequence[str], *, field: str = "source"
) -> SourceLocation:
    """Check a job's source URI against the allow-list and say where its images live.

    Accepts ``s3://bucket/prefix/``, ``file:///abs/dir`` or a local folder path, and only under one
    of ``allowed_prefixes`` (``s3://...`` or ``file://...``; see ``Settings.source_prefixes``).
    Anything else (http(s) and other schemes, other buckets, ``..`` escapes) raises ``ValueError``
    naming ``field`` and the problem. Local paths are resolved (symlinks included) before the check.
    """
    if not isinstance(uri, str) or not uri.strip():
        raise ValueError(f"{field}: empty source URI")
    text = uri.strip()
    if match := _SCHEME_RE.match(text):
        scheme = match.group(1).lower()
        if scheme not in ("s3", "file") or "://" not in text:
            raise ValueError(
                f"{field}: {uri!r} uses scheme {scheme!r}; only s3://bucket/prefix/ or a local "
                "folder is accepted (no URL fetching)"
            )
    location = normalize_location(text, field=field)
    parts = urlsplit(location)
    if parts.scheme == "s3":
        bucket, prefix = parts.netloc, parts.path.strip("/")
        if not _BUCKET_RE.match(bucket):
            raise ValueError(f"{field}: invalid S3 bucket name {bucket!r} in {uri!r}")
        if prefix:
            try:
                check_key(prefix)
            except ValueError as exc:
                raise ValueError(f"{field}: {uri!r}: {exc}") from exc
        canonical = location
        backend, key_prefix = f"s3://{bucket}", f"{prefix}/" if prefix else ""
    else:
        resolved = Path(unquote(parts.path)).resolve()
        canonical = resolved.as_uri()
        backend, key_prefix = canonical, ""
    allowed = [normalize_location(p, field="allowed_source_prefixes") for p in allowed_prefixes]
    allowed = [
        Path(unquote(urlsplit(p).path)).resolve().as_uri() if p.startswith("file:") else p
        for p in allowed
    ]
    if not any(is_within(canonical, parent) for parent in allowed):
        shown = ", ".join(allowed) or "none configured"
        raise ValueError(
            f"{field}: {uri!r} is outside the allowed source prefixes ({shown}); "
            "set DPIG_ALLOWED_SOURCE_PREFIXES to allow it"
        )
    return SourceLocation(uri=canonical, storage_url=backend, prefix=key_prefix)


class ImageSource:
    """The source images under one ``SourceLocation``, read through a ``Storage`` backend.

    Keys are relative to the source folder, recursive, sorted, and limited to image extensions
    (case-insensitive); hidden files are skipped.
    """

    def __init__(self, location: SourceLocation, storage: Storage) -> None:
        self.location = location
        self.storage = storage

    def keys(self, *, limit: int | None = None, max_scanned: int | None = None) -> list[str]:
        """The sorted image keys under the source folder: the first ``limit`` of them when given
        (the listing stops there). Scanning more than ``max_scanned`` objects (images or not)
        raises ``ListingTooLarge``."""
        strip = len(self.location.prefix)
        out: list[str] = []
        for scanned, key in enumerate(self.storage.iter_keys(self.location.prefix), 1):
            if max_scanned is not None and scanned > max_scanned:
                raise ListingTooLarge(
                    f"more than {max_scanned} objects under {self.location.uri}; "
                    "name a narrower prefix"
                )
            rel = key[strip:]
            name = PurePosixPath(rel).name
            if not name.startswith(".") and PurePosixPath(name).suffix.lower() in IMAGE_EXTENSIONS:
                out.append(rel)
                if limit is not None and len(out) >= limit:
                    break
        return out

    def read(self, key: str) -> bytes:
        """The bytes of one image, by a key from ``keys()``."""
        return self.storage.get_bytes(self.location.prefix + check_key(key))

    def url(self, key: str) -> str:
        """The canonical URI of one image."""
        return self.storage.url(self.location.prefix + check_key(key))


def open_image_source(
    uri: str,
    settings: Settings,
    *,
    allowed_prefixes: Sequence[str] | None = None,
    field: str = "source",
) -> ImageSource:
    """Validate ``uri`` (against ``settings.source_prefixes`` unless given) and open its images."""
    prefixes = settings.source_prefixes if allowed_prefixes is None else allowed_prefixes
    location = parse_source_uri(uri, prefixes, field=field)
    return ImageSource(location, storage_from_url(location.storage_url, settings))
