"""Probes and metrics: `/healthz` (alive), `/readyz` (database and storage answer), `/metrics`."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text

from service.api.deps import ContextDep
from service.api.schemas import Status
from service.jobs import HEAD_REVISION, Context
from service.metrics import exposition
from service.storage import S3Storage

log = logging.getLogger(__name__)
READY_TIMEOUT_S = 5.0

router = APIRouter(tags=["health"])
_migrate_lock = threading.Lock()


@router.get("/healthz", response_model=Status)
def healthz() -> Status:
    """The process is alive (no dependency is checked)."""
    return Status(status="ok")


def _check_database(ctx: Context, request: Request) -> str:
    with ctx.sessions() as session:
        session.execute(text("SELECT 1"))
    if not getattr(request.app.state, "migrated", True):
        # the database was down at startup: finish the schema upgrade now that it answers
        from service.db import upgrade_database

        with _migrate_lock:
            if not request.app.state.migrated:
                upgrade_database(ctx.settings.database_url)
                request.app.state.migrated = True
    with ctx.sessions() as session:
        revision = session.execute(text("SELECT version_num FROM alembic_version")).scalar()
    if revision != HEAD_REVISION:
        raise RuntimeError(f"schema at revision {revision}, expected {HEAD_REVISION}")
    return "ok"


def _check_storage(ctx: Context) -> str:
    storage = ctx.storage
    if isinstance(storage, S3Storage):
        storage.client.head_bucket(Bucket=storage.bucket)
    else:
        storage.exists("_readyz")
    return "ok"


async def _run_check(check: Callable[[], str]) -> str:
    with anyio.move_on_after(READY_TIMEOUT_S):
        try:
            return await anyio.to_thread.run_sync(check, abandon_on_cancel=True)
        except Exception as exc:  # noqa: BLE001 - any failure means not ready
            # unauthenticated: the kind of failure only; the message (hosts, buckets) is logged
            log.warning("readiness check failed: %s: %s", type(exc).__name__, exc)
            return f"error: {type(exc).__name__}"
    return f"error: no answer within {READY_TIMEOUT_S:g} s"


@router.get("/readyz", response_model=Status, responses={503: {"model": Status}})
async def readyz(ctx: ContextDep, request: Request) -> Response:
    """Ready to serve: the database answers `SELECT 1` at the latest schema, storage answers."""
    checks = {
        "database": await _run_check(lambda: _check_database(ctx, request)),
        "storage": await _run_check(lambda: _check_storage(ctx)),
    }
    ok = all(value == "ok" for value in checks.values())
    if not ok:
        log.warning("not ready: %s", checks)
    body = Status(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
def metrics() -> Response:
    """Prometheus metrics (all processes' in multiprocess mode)."""
    body, content_type = exposition()
    return Response(body, media_type=content_type)
