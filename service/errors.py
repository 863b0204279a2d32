"""The error the job service answers a refused request with (shared by jobs and tenancy)."""

from __future__ import annotations

import os


class JobError(Exception):
    """A request the job service refuses: `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def tenant_reason(exc: BaseException) -> str:
    """What a tenant may read about `exc` (errors.jsonl, chunk errors): a reason without hosts,
    endpoints, paths or tracebacks. The details go to the operator's logs instead.

    Errors the service raises on purpose carry tenant-safe messages and pass through; storage,
    database and runtime errors are named by kind."""
    from service.executor import (  # the executor imports this module
        ItemError,
        SourceTooLarge,
        WrongWorker,
    )

    # ValueErrors are what reading and checking an input raise on purpose (a URI outside the
    # allowed prefixes, a size over a limit): about the tenant's own input
    if isinstance(exc, (ItemError, JobError, SourceTooLarge, WrongWorker, ValueError)):
        return str(exc)
    name = type(exc).__name__
    if name == "NotFound":  # service.storage's own
        return "object not found"
    if name == "SoftTimeLimitExceeded":
        return "chunk exceeded the soft time limit"
    code = _storage_error_code(exc)
    if code is not None:
        if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
            return "object not found"
        if code in ("AccessDenied", "403", "Forbidden"):
            return "access denied by the storage"
        return f"storage error ({code})"
    if isinstance(exc, FileNotFoundError):
        return "object not found"
    if name in ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError"):
        return "storage unavailable"
    if name in ("OperationalError", "InterfaceError", "DisconnectionError"):
        return "database unavailable"
    if isinstance(exc, MemoryError) or "out of memory" in str(exc).lower():
        return "worker ran out of memory"
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return "temporary network error"
    if isinstance(exc, OSError) and exc.errno:
        return f"I/O error: {os.strerror(exc.errno)}"  # the message without the file name
    return f"internal error ({name}); the operator's logs have the details"


def _storage_error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ClientError (without importing botocore), else None."""
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return None
    code = (response.get("Error") or {}).get("Code")
    return str(code) if code else None
