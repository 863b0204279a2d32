"""The FastAPI application: `create_app(settings)` (a factory, for uvicorn and for tests).

The job-service `Context` (database sessions, output storage) is opened once in the lifespan.
Errors are JSON `{"detail": "<field>: <problem>"}` everywhere (422 adds the structured `errors`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from sqlalchemy.exc import OperationalError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.routes import health, jobs, models
from service.jobs import Context, JobError, open_context
from service.settings import Settings, get_settings
from service.specs import describe_errors
from service.storage import StorageError

log = logging.getLogger(__name__)
_LOCATIONS = ("body", "query", "path", "header", "cookie")


def operation_id(route: APIRoute) -> str:
    """`{tag}-{name}` (e.g. `jobs-submit_job`): readable names in generated clients."""
    return f"{route.tags[0]}-{route.name}"


class BodyLimitMiddleware:
    """413 for bodies over `max_bytes`: at once from Content-Length, or as soon as a streamed
    body passes the limit while it is read (before any parsing, so nothing is written)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> str:
        return f"body: request body exceeds the limit of {self.max_bytes} bytes"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            problem = None
            if not declared.strip().isdigit():
                status, problem = 400, f"Content-Length: not a byte count: {declared[:40]!r}"
            elif int(declared) > self.max_bytes:
                status, problem = 413, self._too_large()
            if problem is not None:
                response = JSONResponse({"detail": problem}, status_code=status)
                await response(scope, receive, send)
                return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # an HTTPException passes through FastAPI's body reading unchanged
                    raise HTTPException(413, self._too_large())
            return message

        await self.app(scope, limited, send)


def _strip_location(loc: Sequence[Any]) -> tuple[Any, ...]:
    """('body', 'sample', 'count') → ('sample', 'count'); a bare ('body',) stays."""
    return tuple(loc[1:]) if len(loc) > 1 and loc[0] in _LOCATIONS else tuple(loc)


class _Errors:
    """Adapts FastAPI's validation errors to `describe_errors` (field paths without 'body')."""

    def __init__(self, errors: Sequence[Any]) -> None:
        self._errors = errors

    def errors(self) -> list[dict[str, Any]]:
        return [{**err, "loc": _strip_location(err.get("loc", ()))} for err in self._errors]


def _validation_detail(errors: Sequence[Any]) -> str:
    parts, others = [], []
    for err in errors:
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "invalid")
            position = err.get("loc", ("body", "?"))[-1]
            parts.append(f"body: malformed JSON at character {position}: {reason}")
        else:
            others.append(err)
    if others:
        parts.append(describe_errors(_Errors(others)))
    return "; ".join(parts)


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    # never echo the input back: it may be large, or hold NaN that JSON cannot carry
    listed = [
        {
            "loc": [p if isinstance(p, int) else str(p) for p in err.get("loc", ())],
            "msg": str(err.get("msg", "invalid")),
            "type": str(err.get("type", "value_error")),
        }
        for err in errors
    ]
    return JSONResponse({"detail": _validation_detail(errors), "errors": listed}, status_code=422)


async def _job_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobError)
    return JSONResponse({"detail": exc.message}, status_code=exc.status)


async def _storage_error(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("storage error: %s", exc)
    # the message names buckets and endpoints: for the operator's log, not the tenant
    return JSONResponse({"detail": "storage unavailable, try again"}, status_code=503)


async def _database_down(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("database error: %s", exc)
    return JSONResponse({"detail": "database unavailable, try again"}, status_code=503)


def _open(settings: Settings) -> tuple[Context, bool]:
    """The context, migrating the schema; a database that does not answer yet is migrated later
    (by the first `/readyz` that reaches it) instead of failing startup."""
    try:
        return open_context(settings, embedded=False), True
    except OperationalError as exc:
        log.warning("database unreachable at startup (%s); not ready until it answers", exc)
        return open_context(settings, embedded=False, migrate=False), False


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API application for `settings` (default: the process settings from the env)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        ctx, migrated = await run_in_threadpool(_open, settings)
        app.state.context, app.state.migrated = ctx, migrated
        try:
            yield
        finally:
            app.state.context = None
            ctx.sessions.kw["bind"].dispose()

    app = FastAPI(
        title="dpig",
        summary="Batch person-image generation (Disentangled Person Image Generation).",
        version="1",
        lifespan=lifespan,
        generate_unique_id_function=operation_id,
    )
    app.state.settings = settings
    app.state.context = None
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(JobError, _job_error)
    app.add_exception_handler(StorageError, _storage_error)
    app.add_exception_handler(OperationalError, _database_down)
    api = APIRouter()
    for router in (jobs.router, models.router, health.router):
        api.include_router(router)
    app.include_router(api)
    return app
