"""Tenant-facing reasons: what errors.jsonl may say about an exception (no hosts, paths, traces)."""

from __future__ import annotations

import errno

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from sqlalchemy.exc import OperationalError

from service.errors import JobError, tenant_reason
from service.executor import ItemError
from service.storage import NotFound


def _client_error(code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "bucket internal-prod at 10.1.2.3"}}, "GetObject"
    )


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (ItemError("s3://acme/a.png: no person found"), "s3://acme/a.png: no person found"),
        (JobError(422, "count must be positive"), "count must be positive"),
        (_client_error("NoSuchKey"), "object not found"),
        (NotFound("s3://internal-prod/jobs/x.png"), "object not found"),
        (
            ValueError("s3://acme/x.png: not under an allowed prefix"),
            "s3://acme/x.png: not under an allowed prefix",
        ),
        (_client_error("AccessDenied"), "access denied by the storage"),
        (_client_error("SlowDown"), "storage error (SlowDown)"),
        (EndpointConnectionError(endpoint_url="http://10.1.2.3:8333/x"), "storage unavailable"),
        (OperationalError("SELECT 1", {}, Exception("host db-7.internal")), "database unavailable"),
        (FileNotFoundError(errno.ENOENT, "No such file", "/srv/data/x.png"), "object not found"),
        (OSError(errno.ENOSPC, "No space", "/srv/out/x.tar"), "I/O error: No space left on device"),
        (ConnectionRefusedError(errno.ECONNREFUSED, "refused"), "temporary network error"),
        (RuntimeError("CUDA out of memory. Tried to allocate 2 GiB"), "worker ran out of memory"),
        (
            KeyError("/srv/models/secret"),
            "internal error (KeyError); the operator's logs have the details",
        ),
    ],
)
def test_reasons_name_the_kind_without_infrastructure(exc: BaseException, reason: str) -> None:
    assert tenant_reason(exc) == reason
    for detail in ("10.1.2.3", "/srv/", "db-7", "internal-prod", "Traceback"):
        assert detail not in tenant_reason(exc)
