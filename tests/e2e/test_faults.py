"""Failure drills (DESIGN §8): a worker SIGKILLed mid-chunk, Redis flushed or restarted, S3 down
for a while, PostgreSQL restarted. Each time the job completes with exactly `total_items` outputs,
none duplicated, byte-identical to an undisturbed run, with no manual action."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]
OUTAGE_S = 20.0


def test_worker_sigkill_mid_chunk(stack: Any, e2e: Any, reference: dict[int, str]) -> None:
    """SIGKILL a worker (parent and prefork child) while it holds a chunk's lease: the lease
    expires, the sweeper re-queues the chunk, and the other worker (or the restarted one) runs
    it again."""
    job = e2e.submit(*e2e.sample_args)
    victim = "worker-0"
    killed: dict[str, Any] | None = None
    deadline = time.monotonic() + 60
    while killed is None and time.monotonic() < deadline:
        owners = e2e.owners(victim)
        held = [c for c in e2e.chunks(job["id"]) if c["state"] == "running"]
        held = [c for c in held if c["lease_owner"] in owners]
        if not held:
            time.sleep(0.01)
            continue
        target = held[0]
        stack.kill(victim)
        after = next(c for c in e2e.chunks(job["id"]) if c["id"] == target["id"])
        if after["state"] == "running" and after["lease_token"] == target["lease_token"]:
            killed = target  # it died holding the lease, mid-chunk
        stack.start(victim)  # committed just before the kill: try the next chunk
    assert killed is not None, "never caught worker-0 holding a chunk"

    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    e2e.check_completed(job["id"], reference)
    rerun = next(c for c in e2e.chunks(job["id"]) if c["id"] == killed["id"])
    assert rerun["state"] == "done"
    assert rerun["attempts"] >= 2, rerun  # the killed attempt counted, then a second one


def test_redis_flushall_mid_job(stack: Any, e2e: Any, reference: dict[int, str]) -> None:
    """Every queued message is lost; the dispatcher re-publishes the chunks whose messages
    never started (PostgreSQL is the truth, Redis only transport)."""
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    stack.redis().flushall()
    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    e2e.check_completed(job["id"], reference)


def test_redis_restart_mid_job(stack: Any, e2e: Any, reference: dict[int, str]) -> None:
    """Redis stops (no persistence: its messages are gone) and starts again on the same port:
    workers and the dispatcher reconnect by themselves."""
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    stack.stop("redis")
    time.sleep(2)
    stack.start("redis")
    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    e2e.check_completed(job["id"], reference)


def test_s3_outage_mid_job(stack: Any, e2e: Any, reference: dict[int, str]) -> None:
    """SeaweedFS is down for ~20 s: chunk attempts fail (after botocore's own few retries) and
    the dispatcher retries them with exponential backoff (2, 4, 8, 16 s: the fifth attempt comes
    30 s after the first) instead of dead-lettering them; the job completes once S3 is back, and
    the failures show in the workers' dpig_chunk_attempts_total{outcome="failed"}."""
    failed_before = e2e.worker_metric("dpig_chunk_attempts_total", 'outcome="failed"')
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    down_at = time.monotonic()
    stack.stop("seaweedfs", timeout=5)  # weed's graceful stop is slow: SIGKILL after 5 s
    time.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    stack.start("seaweedfs")
    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    e2e.check_completed(job["id"], reference)
    failed = e2e.worker_metric("dpig_chunk_attempts_total", 'outcome="failed"') - failed_before
    assert failed > 0, "no chunk attempt failed while S3 was down"
    assert max(c["attempts"] for c in e2e.chunks(job["id"])) > 1


def test_postgres_restart_mid_job(stack: Any, e2e: Any, reference: dict[int, str]) -> None:
    """PostgreSQL restarts: the API, the dispatcher and the workers reconnect by themselves
    (/readyz is 200 again) and the job completes."""
    if not stack.private_postgres:
        pytest.skip("reusing the machine's PostgreSQL server: it is not ours to restart")
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    stack.stop("postgres")
    time.sleep(3)
    assert not stack.api_ready()
    stack.start("postgres")
    e2e.wait_for("/readyz to answer 200", stack.api_ready, timeout=30, every=0.5)
    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    e2e.check_completed(job["id"], reference)
