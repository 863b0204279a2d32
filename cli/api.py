"""`dpig api` (serve the HTTP API with uvicorn) and `dpig keys` (tenants' bearer API keys).

Both read the same DPIG_* settings as the workers: point DPIG_DATABASE_URL at the API's database.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import typer

from cli.errors import fail

if TYPE_CHECKING:
    from service.jobs import Context

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)


def api(
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=1, max=65535, help="TCP port."),
    workers: int = typer.Option(1, min=1, help="Worker processes."),
) -> None:
    """Serve the HTTP API (OpenAPI at /openapi.json, docs at /docs)."""
    import uvicorn

    if workers > 1:
        _migrate_once()
    uvicorn.run("service.api.app:create_app", factory=True, host=host, port=port, workers=workers)


def _migrate_once() -> None:
    """Bring the schema up before forking, so worker processes do not race to migrate it."""
    from sqlalchemy.exc import OperationalError

    try:
        ctx = _context()
    except OperationalError as exc:
        typer.echo(f"warning: database unreachable, not migrated yet: {exc}", err=True)
        return
    ctx.sessions.kw["bind"].dispose()


def _context() -> Context:
    from service.jobs import open_context
    from service.settings import get_settings

    settings = get_settings()
    settings.ensure_dirs()
    return open_context(settings)


@keys_app.command("create")
def create(
    tenant: str = typer.Option(..., "--tenant", help="Tenant name (created if missing)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Make a key for TENANT and print it; only its hash is stored, so it is shown once."""
    from service.db import ApiKey
    from service.db.keys import new_api_key
    from service.jobs import tenant_id

    name = tenant.strip()
    if not name or len(name) > 200:
        fail("--tenant: give a name of 1 to 200 characters")
    ctx = _context()
    tid = tenant_id(ctx, name)
    clear, prefix, key_hash = new_api_key()
    with ctx.session() as session:
        session.add(ApiKey(tenant_id=tid, prefix=prefix, key_hash=key_hash))
    if as_json:
        typer.echo(json.dumps({"tenant": name, "tenant_id": tid, "prefix": prefix, "key": clear}))
        return
    typer.echo(f"API key for tenant {name!r} (prefix {prefix}); store it now:", err=True)
    typer.echo(clear)


@keys_app.command("webhook-secret")
def webhook_secret(
    tenant: str = typer.Option(..., "--tenant", help="Tenant name."),
) -> None:
    """Print TENANT's webhook signing secret (HMAC-SHA256 key of `X-Dpig-Signature`); it is
    derived from DPIG_WEBHOOK_SIGNING_KEY, so rotating that key rotates every tenant's."""
    from sqlalchemy import select

    from service.db import Tenant
    from service.webhooks import CallbackRefused, tenant_secret

    ctx = _context()
    with ctx.session() as session:
        tid = session.scalar(select(Tenant.id).where(Tenant.name == tenant))
    if tid is None:
        fail(f"--tenant: no tenant {tenant!r}")
    try:
        typer.echo(tenant_secret(ctx.settings, int(tid)))
    except CallbackRefused as exc:
        fail(str(exc))


@keys_app.command("list")
def list_keys(
    tenant: str = typer.Option(None, "--tenant", help="Only this tenant's keys."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Every key's prefix, tenant, creation and revocation time (never the key itself)."""
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy import select

    from service.db import ApiKey, Tenant

    ctx = _context()
    with ctx.session() as session:
        query = select(ApiKey, Tenant.name).join(Tenant).order_by(ApiKey.created_at)
        if tenant is not None:
            query = query.where(Tenant.name == tenant)
        rows: list[dict[str, Any]] = [
            {
                "prefix": key.prefix,
                "tenant": name,
                "created_at": key.created_at.isoformat(),
                "revoked_at": key.revoked_at.isoformat() if key.revoked_at else None,
            }
            for key, name in session.execute(query)
        ]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("prefix", "tenant", "created", "revoked")
    for row in rows:
        table.add_row(row["prefix"], row["tenant"], row["created_at"], row["revoked_at"] or "")
    Console().print(table)


@keys_app.command("revoke")
def revoke(
    prefix: str = typer.Argument(..., help="The key's prefix (its first 8 characters)."),
) -> None:
    """Revoke the key(s) with PREFIX: requests with them get 401 from now on."""
    from sqlalchemy import update

    from service.db import ApiKey, utcnow
    from service.db.keys import key_prefix

    prefix = key_prefix(prefix.strip())  # a whole key works too
    ctx = _context()
    with ctx.session() as session:
        result = session.execute(
            update(ApiKey)
            .where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
            .values(revoked_at=utcnow())
        )
        count = int(result.rowcount)  # type: ignore[attr-defined]
    if not count:
        fail(f"PREFIX: no live key with prefix {prefix!r} (see `dpig keys list`)")
    typer.echo(f"revoked {count} key(s) with prefix {prefix}")
