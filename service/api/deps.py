"""Dependencies of the API routes, published as `Annotated` aliases (`ContextDep`, `TenantDep`).

Routes never open engines or storage themselves: the `Context` is built once at startup and kept
on `app.state.context`; tests may swap these with `app.dependency_overrides`.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select

from service.db import ApiKey
from service.db.keys import key_prefix, verify_api_key
from service.jobs import Context

# `new_api_key` makes URL-safe base64 keys; anything else cannot be a key (and never reaches SQL)
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{8,256}$")

bearer = HTTPBearer(
    auto_error=False,
    bearerFormat="dpig API key",
    description="`Authorization: Bearer <key>`; keys are made with `dpig keys create`.",
)


def get_context(request: Request) -> Context:
    """The job-service context built by the app's lifespan."""
    ctx: Context | None = getattr(request.app.state, "context", None)
    if ctx is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "the service is starting")
    return ctx


ContextDep = Annotated[Context, Depends(get_context)]


def _unauthorized(message: str) -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED, message, headers={"WWW-Authenticate": "Bearer"}
    )


def lookup_tenant(ctx: Context, key: str) -> int | None:
    """The tenant id of a live (not revoked) API key, or None."""
    if not _KEY_RE.match(key):
        return None
    with ctx.session() as session:
        rows = session.scalars(
            select(ApiKey).where(ApiKey.prefix == key_prefix(key), ApiKey.revoked_at.is_(None))
        ).all()
        for row in rows:  # a prefix is almost always unique; the hash decides
            if verify_api_key(key, row.key_hash):
                return int(row.tenant_id)
    return None


def get_tenant(
    ctx: ContextDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> int:
    """The tenant id of the request's bearer key; 401 without a valid key."""
    if credentials is None:
        raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    tenant = lookup_tenant(ctx, credentials.credentials)
    if tenant is None:
        raise _unauthorized("invalid or revoked API key")
    return tenant


TenantDep = Annotated[int, Depends(get_tenant)]
