"""Webhooks (service/webhooks.py): a receiver on 127.0.0.1 (allowed explicitly: it is a private
address) gets each terminal state, signed; failures are retried with backoff and every attempt is
recorded; redirects are not followed; private and unlisted callbacks are refused at submit."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from service.db import WebhookDelivery, utcnow
from service.dispatch import finalize_ready
from service.executor import PipelineCache
from service.jobs import Context, JobError, cancel, open_context, submit, tenant_id
from service.runner import run_job
from service.settings import Settings
from service.specs import parse_spec
from service.webhooks import SIGNATURE_HEADER, deliver_due, tenant_secret

pytestmark = pytest.mark.usefixtures("single_thread_torch")


class Receiver:
    """An HTTP server on 127.0.0.1 answering POSTs with the scripted statuses (then 200)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append((self.path, dict(self.headers), body))
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if status in (301, 302, 307):
                    self.send_header("Location", f"{receiver.url}/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache(batch_size=4)


def make_ctx(tmp_path: Path, **values: Any) -> Context:
    base = {
        "home": tmp_path / "home",
        "webhook_allowed_hosts": ["127.0.0.1", "localhost"],
        "webhook_allow_private": True,
        "webhook_signing_key": "operator-signing-key-0123456789",
        "webhook_backoff_s": 10.0,
    }
    return open_context(Settings.from_values(**(base | values)), embedded=True)


def deliveries(ctx: Context) -> list[WebhookDelivery]:
    with ctx.session() as session:
        rows = session.scalars(select(WebhookDelivery).order_by(WebhookDelivery.id)).all()
        session.expunge_all()
        return list(rows)


def test_a_webhook_is_delivered_signed_and_retried(
    tmp_path: Path, receiver: Receiver, pipes: PipelineCache
) -> None:
    ctx = make_ctx(tmp_path)
    tenant = tenant_id(ctx)
    url = f"{receiver.url}/hooks/dpig?src=test"
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 2, "callback_url": url}))
    assert run_job(ctx, job.id, pipes) == "completed"
    (pending,) = deliveries(ctx)
    assert (pending.state, pending.event, pending.attempts) == ("pending", "job.completed", 0)

    receiver.statuses = [500]
    t0 = utcnow()
    assert deliver_due(ctx, now=t0) == 0
    (first,) = deliveries(ctx)
    assert (first.state, first.attempts, first.last_status) == ("pending", 1, 500)
    assert first.last_error == "HTTP 500" and first.next_attempt_at == t0 + timedelta(seconds=10)
    assert deliver_due(ctx, now=t0 + timedelta(seconds=9)) == 0  # not due yet
    assert len(receiver.requests) == 1
    assert deliver_due(ctx, now=t0 + timedelta(seconds=10)) == 1
    (done,) = deliveries(ctx)
    assert (done.state, done.attempts, done.last_status, done.last_error) == (
        "delivered", 2, 200, None
    )  # fmt: skip

    assert len(receiver.requests) == 2
    path, headers, body = receiver.requests[-1]
    assert path == "/hooks/dpig?src=test"
    assert headers["Host"] == receiver.url.removeprefix("http://")
    assert receiver.requests[0][2] == body  # a retry sends the same bytes
    secret = tenant_secret(ctx.settings, tenant)
    expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    assert headers[SIGNATURE_HEADER] == expected
    assert headers["X-Dpig-Event"] == "job.completed"
    payload = json.loads(body)
    assert payload["type"] == "job.completed"
    assert (payload["job"]["id"], payload["job"]["done_items"]) == (job.id, 2)
    # another tenant's secret does not verify it
    other = tenant_secret(ctx.settings, tenant_id(ctx, "other"))
    assert (
        hmac.new(other.encode(), body, hashlib.sha256).hexdigest() not in headers[SIGNATURE_HEADER]
    )

    # every terminal state is sent: a cancelled job too; and giving up is recorded
    doomed = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 2, "callback_url": url}))
    cancel(ctx, tenant, doomed.id)
    finalize_ready(ctx)
    receiver.statuses = [503] * 4
    later = t0 + timedelta(minutes=1)
    for step in range(3):
        deliver_due(ctx, now=later + timedelta(hours=step))
    last = deliveries(ctx)[-1]
    assert (last.event, last.attempts, last.last_status) == ("job.cancelled", 3, 503)
    assert last.state == "pending"  # 8 attempts by default
    ctx.settings.webhook_max_attempts = 4
    deliver_due(ctx, now=later + timedelta(hours=5))
    assert (deliveries(ctx)[-1].state, deliveries(ctx)[-1].attempts) == ("failed", 4)


def test_redirects_are_not_followed(tmp_path: Path, receiver: Receiver) -> None:
    ctx = make_ctx(tmp_path)
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({
        "kind": "sample", "count": 2, "callback_url": receiver.url + "/hook"
    }))  # fmt: skip
    cancel(ctx, tenant, job.id)
    finalize_ready(ctx)
    receiver.statuses = [302]
    assert deliver_due(ctx) == 0
    (row,) = deliveries(ctx)
    assert row.last_status == 302 and row.last_error == "HTTP 302 (redirects are not followed)"
    assert [path for path, _, _ in receiver.requests] == ["/hook"]  # never /elsewhere


@pytest.mark.parametrize(
    ("values", "url", "message"),
    [
        ({"webhook_allow_private": False}, "http://127.0.0.1:9/h",
         "'127.0.0.1' resolves to the private address 127.0.0.1; refused"),
        ({"webhook_allow_private": False}, "http://localhost:9/h",
         "'localhost' resolves to the private address"),
        ({"webhook_allow_private": False, "webhook_allowed_hosts": ["10.1.2.3"]},
         "http://10.1.2.3/h", "private address 10.1.2.3"),
        ({"webhook_allow_private": False, "webhook_allowed_hosts": ["169.254.169.254"]},
         "http://169.254.169.254/latest/meta-data", "private address 169.254.169.254"),
        ({}, "http://example.org/h", "host 'example.org' is not on the webhook allow-list"),
        ({}, "http://127.0.0.1.example.org/h", "is not on the webhook allow-list"),
        ({}, "ftp://127.0.0.1/h", "scheme 'ftp' is not http or https"),
        ({}, "http://user:pw@127.0.0.1/h", "credentials in the URL are not accepted"),
        ({"webhook_allowed_hosts": []}, "http://127.0.0.1/h", "webhooks are not enabled"),
        ({"webhook_signing_key": None}, "http://127.0.0.1/h", "DPIG_WEBHOOK_SIGNING_KEY"),
    ],
)  # fmt: skip
def test_unsafe_callbacks_are_refused_at_submit(
    tmp_path: Path, values: dict[str, Any], url: str, message: str
) -> None:
    ctx = make_ctx(tmp_path, **values)
    with pytest.raises(JobError) as refused:
        submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 1, "callback_url": url}))
    assert refused.value.status == 422 and message in refused.value.message
    assert refused.value.message.startswith("callback_url: ") or "SIGNING_KEY" in message
    with ctx.session() as session:
        assert session.scalars(select(WebhookDelivery)).all() == []
