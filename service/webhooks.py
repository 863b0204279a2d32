"""Webhooks (docs/api.md, "Webhooks"): a job's `callback_url` is called on every terminal state.

- Signed: `X-Dpig-Signature: sha256=<hex>`, HMAC-SHA256 over the exact body with the tenant's
  secret (`tenant_secret`, derived from the operator's `DPIG_WEBHOOK_SIGNING_KEY`).
- Retried with backoff: `deliver_due` (run by the dispatcher every tick) sends due deliveries;
  a non-2xx answer or an error is retried after `webhook_backoff_s` × 2^(attempt − 1) (at most
  an hour), up to `webhook_max_attempts`. Each notification is a `webhook_deliveries` row with its
  attempts, last status and error.
- No SSRF: only http(s) to a host on `DPIG_WEBHOOK_ALLOWED_HOSTS`, never with credentials in
  the URL, no redirects followed; the host is resolved and *every* address must be public
  (unless `DPIG_WEBHOOK_ALLOW_PRIVATE`), and the request goes to the address that was checked
  (the Host header and TLS name stay the URL's), so DNS cannot switch it afterwards.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import socket
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from service import metrics
from service.db import Job, WebhookDelivery, utcnow
from service.errors import JobError
from service.settings import Settings

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "X-Dpig-Signature"
MAX_BACKOFF_S = 3600.0
BATCH = 50  # deliveries per tick


class CallbackRefused(ValueError):
    """A callback URL that may not be called (one line naming the problem)."""


def tenant_secret(settings: Settings, tenant_id: int) -> str:
    """The tenant's signing secret: HMAC of its id under the operator's key (nothing stored)."""
    if settings.webhook_signing_key is None:
        raise CallbackRefused("webhooks need DPIG_WEBHOOK_SIGNING_KEY on the server")
    key = settings.webhook_signing_key.get_secret_value().encode()
    return hmac.new(key, f"dpig-webhook-tenant:{tenant_id}".encode(), hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes) -> str:
    """The signature header's value for `body`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def _host_allowed(host: str, allowed: list[str]) -> bool:
    for pattern in allowed:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*.") and host.endswith(pattern[1:]) and host != pattern[2:]:
            return True
        if host == pattern:
            return True
    return False


def _resolve(host: str, port: int) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise CallbackRefused(f"callback_url: cannot resolve {host!r} ({exc})") from None
    return sorted({str(info[4][0]) for info in infos})


def check_callback_url(url: str, settings: Settings) -> tuple[Any, list[str]]:
    """The URL's parts and its checked addresses; raises CallbackRefused."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise CallbackRefused(f"callback_url: scheme {parts.scheme!r} is not http or https")
    if parts.username is not None or parts.password is not None:
        raise CallbackRefused("callback_url: credentials in the URL are not accepted")
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise CallbackRefused("callback_url: no host")
    if not settings.webhook_allowed_hosts:
        raise CallbackRefused(
            "callback_url: webhooks are not enabled on this server (DPIG_WEBHOOK_ALLOWED_HOSTS)"
        )
    if not _host_allowed(host, settings.webhook_allowed_hosts):
        raise CallbackRefused(f"callback_url: host {host!r} is not on the webhook allow-list")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise CallbackRefused("callback_url: bad port") from None
    addresses = _resolve(host, port)
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if ip.is_multicast or ip.is_unspecified:
            raise CallbackRefused(f"callback_url: {host!r} resolves to {ip}, not a host")
        if not ip.is_global and not settings.webhook_allow_private:
            raise CallbackRefused(
                f"callback_url: {host!r} resolves to the private address {ip}; refused"
            )
    if not addresses:
        raise CallbackRefused(f"callback_url: {host!r} has no address")
    return parts, addresses


def check_submit(settings: Settings, tenant_id: int, callback_url: str | None) -> None:
    """Refuse (422) at submit a callback that could never be called."""
    if callback_url is None:
        return
    try:
        check_callback_url(callback_url, settings)
        tenant_secret(settings, tenant_id)
    except CallbackRefused as exc:
        raise JobError(422, str(exc)) from None


def enqueue(session: Session, job: Job) -> None:
    """Record a notification of the job's (terminal) state, to be sent by `deliver_due`."""
    url = (job.spec or {}).get("callback_url")
    if not url:
        return
    payload = {
        "type": f"job.{job.state}",
        "job": {
            "id": job.id,
            "kind": job.kind,
            "state": job.state,
            "total_items": job.total_items,
            "done_items": job.done_items,
            "failed_items": job.failed_items,
            "output_uri": job.output_uri,
            "error": job.error,
            "finished_at": job.finished_at.isoformat() if job.finished_at else None,
            "deleted_at": job.deleted_at.isoformat() if job.deleted_at else None,
        },
        "created_at": utcnow().isoformat(),
    }
    session.add(
        WebhookDelivery(
            job_id=job.id,
            tenant_id=job.tenant_id,
            url=url,
            event=payload["type"],
            body=json.dumps(payload, sort_keys=True),
        )
    )


def _post(settings: Settings, url: str, body: bytes, headers: dict[str, str]) -> int:
    """POST to the checked address of `url`, no redirects; returns the status code."""
    import httpx

    parts, addresses = check_callback_url(url, settings)
    address = addresses[0]
    netloc = f"[{address}]" if ":" in address else address
    if parts.port:
        netloc += f":{parts.port}"
    target = parts._replace(netloc=netloc).geturl()
    host_header = parts.hostname + (f":{parts.port}" if parts.port else "")
    extensions = {"sni_hostname": parts.hostname} if parts.scheme == "https" else {}
    with httpx.Client(
        follow_redirects=False, timeout=settings.webhook_timeout_s, trust_env=False
    ) as client:
        response = client.post(
            target, content=body, headers=headers | {"Host": host_header}, extensions=extensions
        )
    return response.status_code


def deliver_due(ctx: Any, now: datetime | None = None) -> int:
    """Send every delivery that is due; returns how many were delivered."""
    settings: Settings = ctx.settings
    now = now or utcnow()
    with ctx.session() as session:
        due = session.scalars(
            select(WebhookDelivery.id)
            .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
            .order_by(WebhookDelivery.next_attempt_at)
            .limit(BATCH)
        ).all()
    delivered = 0
    for delivery_id in due:
        with ctx.session() as session:
            row = session.get(WebhookDelivery, delivery_id)
            assert row is not None
            url, body, tenant, event = row.url, row.body.encode(), row.tenant_id, row.event
        status: int | None = None
        error: str | None = None
        try:
            headers = {
                "Content-Type": "application/json",
                "User-Agent": "dpig-webhooks/1",
                "X-Dpig-Event": event,
                "X-Dpig-Delivery": str(delivery_id),
                SIGNATURE_HEADER: sign(tenant_secret(settings, tenant), body),
            }
            status = _post(settings, url, body, headers)
            if not 200 <= status < 300:
                error = f"HTTP {status}" + (" (redirects are not followed)" if status < 400 else "")
        except CallbackRefused as exc:
            error = str(exc)
        except Exception as exc:  # noqa: BLE001 - any transport error is a failed attempt
            error = f"{type(exc).__name__}: {exc}"[:500]
        with ctx.session() as session:
            row = session.get(WebhookDelivery, delivery_id, with_for_update=True)
            assert row is not None
            row.attempts += 1
            row.last_status, row.last_error = status, error
            if error is None:
                row.state, row.delivered_at = "delivered", now
                delivered += 1
                result = "delivered"
            elif row.attempts >= settings.webhook_max_attempts:
                row.state, result = "failed", "failed"
            else:
                wait = min(settings.webhook_backoff_s * 2 ** (row.attempts - 1), MAX_BACKOFF_S)
                row.next_attempt_at, result = now + timedelta(seconds=wait), "retry"
        metrics.WEBHOOK_ATTEMPTS.labels(result).inc()
        if error is not None:
            log.warning("webhook %d to %s: %s (%s)", delivery_id, url, error, result)
    return delivered
