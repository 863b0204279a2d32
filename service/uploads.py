"""Objects written piece by piece while they are made (``Storage.open_upload``).

Nobody sees the key until ``finish``, which publishes the whole object at once; ``abort`` leaves
nothing behind. On S3 the pieces go up as a multipart upload in background threads while the
caller keeps writing, so only the last part and the commit are left at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor, wait
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from botocore.exceptions import BotoCoreError, ClientError

from service.storage import _TMP_PREFIX, S3Storage, StorageError, _error_code

__all__ = ["MIN_PART_BYTES", "LocalUpload", "S3Upload", "Upload"]

log = logging.getLogger(__name__)

MIN_PART_BYTES = 5 * 1024 * 1024  # S3's smallest part, except the last one
MAX_PART_BYTES = 5 * 1024**3
MAX_PARTS = 10_000
# the CRC32 that boto3's upload_file asks for: on AWS, parts sent with a checksum need an upload
# created with the same algorithm
_CHECKSUM = "CRC32"


class Upload(ABC):
    """One object being written: ``write`` the bytes in order, then ``finish`` to publish them,
    or ``abort``. As a context manager it aborts unless finished. After a ``StorageError`` from
    ``write`` or ``finish`` the upload is already aborted."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.finished = False
        self.aborted = False

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append ``data``."""

    @abstractmethod
    def finish(self) -> None:
        """Publish what was written, atomically: readers see the old object or the whole new one."""

    @abstractmethod
    def abort(self) -> None:
        """Drop what was written; nothing stays behind. Does nothing after ``finish`` or a first
        ``abort``."""

    def _check_open(self) -> None:
        if self.finished or self.aborted:
            state = "finished" if self.finished else "aborted"
            raise ValueError(f"upload of {self.url} is already {state}")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


class LocalUpload(Upload):
    """A temporary file beside ``target`` (its name skipped by listings), renamed over it at the
    end."""

    def __init__(self, target: Path, url: str) -> None:
        super().__init__(url)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # in the target's folder, so that the rename is atomic
            fd, temp = tempfile.mkstemp(dir=target.parent, prefix=_TMP_PREFIX)
        except OSError as exc:
            raise StorageError(f"cannot write {url}: {exc}") from exc
        self._handle = os.fdopen(fd, "wb")
        self._temp = Path(temp)
        self._target = target

    def write(self, data: bytes) -> None:
        self._check_open()
        try:
            self._handle.write(data)
        except OSError as exc:
            self.abort()
            raise StorageError(f"cannot write {self.url}: {exc}") from exc

    def finish(self) -> None:
        self._check_open()
        try:
            self._handle.flush()
            # fsync before the rename: after a crash the key holds old or new bytes, never a
            # truncated file behind a commit marker
            os.fsync(self._handle.fileno())
            self._handle.close()
            # mkstemp creates 0600; outputs are meant to be read by other users and tools
            os.chmod(self._temp, 0o644)
            os.replace(self._temp, self._target)
        except OSError as exc:
            self.abort()
            raise StorageError(f"cannot write {self.url}: {exc}") from exc
        self.finished = True

    def abort(self) -> None:
        if self.finished or self.aborted:
            return
        self.aborted = True
        with contextlib.suppress(OSError):
            self._handle.close()
        self._temp.unlink(missing_ok=True)


class S3Upload(Upload):
    """Writes gather into parts of ``storage.part_bytes``; each full part goes to one of
    ``storage.upload_threads`` background threads, and ``write`` blocks while that many parts
    are queued or going up, so at most one more part than threads is held in memory. The
    multipart upload is created with the first full part: a smaller object is one
    ``put_object`` at ``finish``."""

    def __init__(self, storage: S3Storage, key: str, content_type: str) -> None:
        part_bytes, threads = storage.part_bytes, storage.upload_threads
        if not MIN_PART_BYTES <= part_bytes <= MAX_PART_BYTES:
            raise ValueError(
                f"part_bytes must be in [{MIN_PART_BYTES}, {MAX_PART_BYTES}], got {part_bytes}"
            )
        if threads < 1:
            raise ValueError(f"upload_threads must be at least 1, got {threads}")
        super().__init__(storage.url(key))
        self._client = storage.client
        self._bucket = storage.bucket
        self._key = storage._key(key)
        self._content_type = content_type
        self._part_bytes = part_bytes
        self._threads = threads
        self._buffer = bytearray()
        self._pool: ThreadPoolExecutor | None = None
        self._slots = threading.Semaphore(threads)
        self._created: Future[str] | None = None  # the multipart upload's id
        self._parts: list[Future[dict[str, Any]]] = []

    def write(self, data: bytes) -> None:
        self._check_open()
        self._raise_if_failed()
        self._buffer += data
        # strictly more than a part: the last part, sent by finish, is never empty
        while len(self._buffer) > self._part_bytes:
            with memoryview(self._buffer) as view:
                part = bytes(view[: self._part_bytes])  # one copy; a bytearray slice is two
            del self._buffer[: self._part_bytes]
            self._send(part)

    def finish(self) -> None:
        self._check_open()
        if self._created is None:
            self._put_whole()
        else:
            self._send(bytes(self._buffer))
            self._buffer.clear()
            self._complete()
        self.finished = True

    def abort(self) -> None:
        if self.finished or self.aborted:
            return
        self.aborted = True
        self._buffer.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        created = self._created
        if created is None or created.cancelled() or created.exception() is not None:
            return
        try:
            self._client.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=created.result()
            )
        except (ClientError, BotoCoreError) as exc:
            if not (isinstance(exc, ClientError) and _error_code(exc) == "NoSuchUpload"):
                # left to the bucket's AbortIncompleteMultipartUpload rule (docs/operations.md)
                log.warning("cannot abort the upload of %s: %s", self.url, exc)

    def _send(self, part: bytes) -> None:
        if len(self._parts) == MAX_PARTS:
            self.abort()
            raise StorageError(f"cannot upload {self.url}: more than {MAX_PARTS} parts")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="dpig-upload")
            self._created = self._pool.submit(self._create)
        self._slots.acquire()  # backpressure: wait for a thread to take the part
        self._raise_if_failed()
        number = len(self._parts) + 1
        future = self._pool.submit(self._upload_part, number, part)
        future.add_done_callback(lambda _: self._slots.release())
        self._parts.append(future)

    def _create(self) -> str:
        response = self._client.create_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            ContentType=self._content_type,
            ChecksumAlgorithm=_CHECKSUM,
        )
        return str(response["UploadId"])

    def _upload_part(self, number: int, data: bytes) -> dict[str, Any]:
        assert self._created is not None
        response = self._client.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._created.result(),
            PartNumber=number,
            Body=data,
            ChecksumAlgorithm=_CHECKSUM,
        )
        part = {"PartNumber": number, "ETag": response["ETag"]}
        if f"Checksum{_CHECKSUM}" in response:
            part[f"Checksum{_CHECKSUM}"] = response[f"Checksum{_CHECKSUM}"]
        return part

    def _raise_if_failed(self) -> None:
        """Abort and raise ``StorageError`` if a part (or the upload's creation) has failed."""
        futures = [f for f in (self._created, *self._parts) if f is not None and f.done()]
        error = next((f.exception() for f in futures if f.exception() is not None), None)
        if error is not None:
            self.abort()
            raise StorageError(f"cannot upload {self.url}: {error}") from error

    def _put_whole(self) -> None:
        try:
            self._client.put_object(
                Bucket=self._bucket,
                Key=self._key,
                Body=bytes(self._buffer),
                ContentType=self._content_type,
            )
        except (ClientError, BotoCoreError) as exc:
            self.abort()
            raise StorageError(f"cannot upload {self.url}: {exc}") from exc
        finally:
            self._buffer.clear()

    def _complete(self) -> None:
        wait(self._parts)
        self._raise_if_failed()
        assert self._created is not None and self._pool is not None
        try:
            self._client.complete_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                UploadId=self._created.result(),
                MultipartUpload={"Parts": [part.result() for part in self._parts]},
            )
        except (ClientError, BotoCoreError) as exc:
            self.abort()
            raise StorageError(f"cannot upload {self.url}: {exc}") from exc
        self._pool.shutdown()
