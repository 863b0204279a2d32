"""The dispatcher (DESIGN §3): PostgreSQL decides what runs next, Celery only carries chunk ids.

One `tick` does, in order:
1. sweep: running chunks whose lease expired go back to pending (dead after max_attempts);
2. re-publish: pending chunks published more than `republish_after_s` ago whose message was
   lost (a Redis flush or restart) are published again; a duplicate is harmless because a task
   only runs a chunk it can lease. A message is presumed lost only when its task received it
   without starting the chunk, or when its queue has stalled: nothing of the queue running, and
   no chunk of it received or finished for `republish_after_s`. A backlog that merely waits
   behind busy workers is never re-sent;
3. publish just in time: per queue, up to `max_in_flight` chunks published-or-running, chosen by
   priority and then round-robin across tenants (a window function in SQL), oldest job first; a
   chunk whose last attempt failed waits out an exponential backoff first, so that an outage of a
   dependency (S3, say) does not burn through its attempts in seconds;
4. mark unfinished jobs past their `expires_at` for expiry (service.retention);
5. finalise jobs whose chunks are all terminal (expired ones included) and delete the outputs of
   finished jobs past their `retain_days`, unless `finalize_in_tick` is off: `dpig dispatcher`
   does both in a thread of its own (`housekeep`), so that a long finalisation or deletion never
   holds up publishing and lease sweeping;
6. send the webhooks that are due (service.webhooks) and refresh the gauges.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select, true, update
from sqlalchemy.orm import Session

from service import metrics, retention, webhooks
from service.chunks import requeue_expired
from service.context import Context, db_now
from service.db import Chunk, ChunkState, Job, JobState, Queue
from service.finalize import maybe_finalize

log = logging.getLogger(__name__)
Publish = Callable[[int, str], None]  # (chunk id, queue) → send the message
RUNNABLE = (JobState.QUEUED, JobState.RUNNING)


@dataclass
class DispatchConfig:
    max_in_flight: dict[str, int] = field(
        default_factory=lambda: {Queue.INTERACTIVE: 4, Queue.BULK: 8}
    )
    republish_after_s: float = 120.0
    # a chunk whose last attempt failed is published again no sooner than retry_backoff_s ×
    # 2^(attempts − 1), at most retry_backoff_max_s, after that attempt started (0: at once)
    retry_backoff_s: float = 0.0
    retry_backoff_max_s: float = 300.0
    # the gauges are refreshed at most this often (0: every tick)
    gauges_every_s: float = 0.0
    gauges_refreshed_at: float = field(default=float("-inf"), repr=False)
    finalize_in_tick: bool = True


@dataclass
class TickReport:
    expired: int = 0
    republished: int = 0
    published: dict[str, int] = field(default_factory=dict)
    finalized: int = 0


def _in_flight_query() -> Any:
    """Published-or-running chunks per queue, in one grouped query."""
    return (
        select(Job.queue, func.count())
        .select_from(Chunk)
        .join(Job)
        .where(
            or_(
                Chunk.state == ChunkState.RUNNING,
                # a paused or cancelled job's unstarted messages are skipped by the workers:
                # they must not hold the queue's slots
                and_(
                    Chunk.state == ChunkState.PENDING,
                    Chunk.published_at.is_not(None),
                    Job.state.in_(RUNNABLE),
                ),
            ),
        )
        .group_by(Job.queue)
    )


def _in_flight(session: Session, queues: list[str]) -> dict[str, int]:
    query = _in_flight_query().where(Job.queue.in_(queues))
    counts = {str(queue): int(n or 0) for queue, n in session.execute(query).all()}
    return {queue: counts.get(queue, 0) for queue in queues}


def retry_due(now: datetime, backoff_s: float, max_s: float) -> ColumnElement[bool]:
    """Chunks that never failed, or whose last failed attempt started at least
    backoff_s × 2^(attempts − 1) (capped at max_s) before `now`."""
    if backoff_s <= 0:
        return true()
    waits, attempts, delay = [], 1, backoff_s
    while delay < max_s:
        cutoff = now - timedelta(seconds=delay)
        waits.append(and_(Chunk.attempts == attempts, Chunk.started_at <= cutoff))
        attempts, delay = attempts + 1, delay * 2
    waits.append(
        and_(Chunk.attempts >= attempts, Chunk.started_at <= now - timedelta(seconds=max_s))
    )
    return or_(Chunk.attempts == 0, Chunk.last_error.is_(None), Chunk.started_at.is_(None), *waits)


def next_chunks(
    ctx: Context,
    queue: str,
    limit: int,
    *,
    retry_backoff_s: float = 0.0,
    retry_backoff_max_s: float = 300.0,
) -> list[int]:
    """Unpublished pending chunks of runnable jobs in `queue`: highest priority first, then one
    chunk per tenant in turn (a tenant's k-th chunk waits for every tenant's (k−1)-th), oldest job
    and lowest chunk index first within a tenant. A chunk that failed waits for its backoff."""
    if limit <= 0:
        return []
    with ctx.session() as session:
        return _next_chunks(session, queue, limit, retry_backoff_s, retry_backoff_max_s)


def _next_chunks(
    session: Session, queue: str, limit: int, retry_backoff_s: float, retry_backoff_max_s: float
) -> list[int]:
    if limit <= 0:
        return []
    due = retry_due(db_now(session), retry_backoff_s, retry_backoff_max_s)
    turn = func.row_number().over(
        partition_by=Job.tenant_id, order_by=(Job.priority.desc(), Job.created_at, Chunk.index)
    )
    ranked = (
        select(Chunk.id.label("chunk_id"), Job.priority, Job.created_at, Chunk.index,
               turn.label("turn"))
        .join(Job, Job.id == Chunk.job_id)
        .where(Job.queue == queue, Job.state.in_(RUNNABLE), Chunk.state == ChunkState.PENDING,
               Chunk.published_at.is_(None), due)
        .subquery()
    )  # fmt: skip
    query = (
        select(ranked.c.chunk_id)
        .order_by(ranked.c.priority.desc(), ranked.c.turn, ranked.c.created_at, ranked.c.index)
        .limit(limit)
    )
    return [int(row) for row in session.scalars(query)]


def _mark_published(ctx: Context, chunk_ids: list[int], *, sent: bool) -> None:
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.id.in_(chunk_ids), Chunk.state == ChunkState.PENDING)
            .values(published_at=db_now(session) if sent else None)
        )


def _publish(ctx: Context, chunk_ids: list[int], queue: str, publish: Publish) -> int:
    """Mark first, then send: a crash in between leaves a marked chunk with no message, which the
    re-publish step recovers; a send that fails is unmarked at once."""
    if not chunk_ids:
        return 0
    _mark_published(ctx, chunk_ids, sent=True)
    sent = 0
    for chunk_id in chunk_ids:
        try:
            publish(chunk_id, queue)
            sent += 1
        except Exception as exc:  # noqa: BLE001 - the broker is down: try again next tick
            log.warning("publishing chunk %d to %s failed: %s", chunk_id, queue, exc)
            _mark_published(ctx, chunk_ids[sent:], sent=False)
            break
    return sent


def _lost(session: Session, older_than_s: float) -> ColumnElement[bool]:
    cutoff = db_now(session) - timedelta(seconds=older_than_s)
    # a queue shows life while a chunk of it runs or was received or finished lately
    alive = (
        select(Job.queue)
        .select_from(Chunk)
        .join(Job)
        .where(
            Job.state.in_(RUNNABLE),
            or_(
                Chunk.state == ChunkState.RUNNING,
                Chunk.received_at >= cutoff,
                Chunk.finished_at >= cutoff,
            ),
        )
        .distinct()
    )
    live_queues = [str(queue) for queue in session.scalars(alive)]
    return and_(
        Chunk.published_at < cutoff,
        or_(Chunk.received_at >= Chunk.published_at, Job.queue.not_in(live_queues)),
    )


def republish_lost(ctx: Context, publish: Publish, older_than_s: float) -> int:
    """Pending chunks whose message went out more than `older_than_s` ago and was lost: received
    without starting the chunk, or never received in a queue that has stalled."""
    with ctx.session() as session:
        rows = session.execute(
            select(Chunk.id, Job.queue)
            .join(Job)
            .where(Chunk.state == ChunkState.PENDING, Job.state.in_(RUNNABLE),
                   _lost(session, older_than_s))
        ).all()  # fmt: skip
    by_queue: dict[str, list[int]] = {}
    for chunk_id, queue in rows:
        by_queue.setdefault(queue, []).append(int(chunk_id))
    return sum(_publish(ctx, ids, queue, publish) for queue, ids in by_queue.items())


def finalize_ready(ctx: Context) -> int:
    """Finalise every job that has no pending or running chunk left (or, when cancelling, no
    running chunk). A job left `finalizing` by a finalisation that failed (storage down while
    the manifest was written) is finalised again."""
    states = (JobState.QUEUED, JobState.RUNNING, JobState.FINALIZING, JobState.CANCELLING)
    # only jobs with nothing left to wait for (maybe_finalize checks again, under a row lock):
    # one query, not a transaction per active job
    running = select(Chunk.id).where(Chunk.job_id == Job.id, Chunk.state == ChunkState.RUNNING)
    pending = select(Chunk.id).where(Chunk.job_id == Job.id, Chunk.state == ChunkState.PENDING)
    with ctx.session() as session:
        candidates = session.scalars(
            select(Job.id).where(
                Job.state.in_(states),
                ~running.exists(),
                or_(Job.state == JobState.CANCELLING, ~pending.exists()),
            )
        ).all()
    return sum(maybe_finalize(ctx, job_id) for job_id in candidates)


def housekeep(ctx: Context) -> int:
    """What `tick` leaves to a finaliser thread when `finalize_in_tick` is off: finalise the
    jobs that are ready (expired ones included) and delete outputs past their retention.
    Returns how many jobs were finalised."""
    finalized = finalize_ready(ctx)
    retention.delete_due(ctx)
    return finalized


def refresh_gauges(ctx: Context) -> None:
    """dpig_work_items_outstanding{queue,state} and dpig_jobs{state} from the database."""
    with ctx.session() as session:
        rows = session.execute(
            select(Job.queue, Chunk.state, func.sum(Chunk.item_stop - Chunk.item_start))
            .join(Job)
            .where(Chunk.state.in_((ChunkState.PENDING, ChunkState.RUNNING)),
                   Job.state.in_(RUNNABLE))
            .group_by(Job.queue, Chunk.state)
        ).all()  # fmt: skip
        jobs = dict(session.execute(select(Job.state, func.count()).group_by(Job.state)).all())
    outstanding = {(q, s): int(n or 0) for q, s, n in rows}
    for queue in Queue:
        for state in (ChunkState.PENDING, ChunkState.RUNNING):
            metrics.OUTSTANDING.labels(queue.value, state.value).set(
                outstanding.get((queue.value, state.value), 0)
            )
    for job_state in JobState:
        metrics.JOBS.labels(job_state.value).set(int(jobs.get(job_state.value, 0)))


def tick(ctx: Context, publish: Publish, config: DispatchConfig) -> TickReport:
    report = TickReport()
    report.expired = requeue_expired(ctx)
    report.republished = republish_lost(ctx, publish, config.republish_after_s)
    # the queues are independent: read every queue's free slots and next chunks in one
    # transaction, then mark and send per queue
    queues = list(config.max_in_flight)
    with ctx.session() as session:
        in_flight = _in_flight(session, queues)
        ready = {
            queue: _next_chunks(
                session,
                queue,
                bound - in_flight[queue],
                config.retry_backoff_s,
                config.retry_backoff_max_s,
            )
            for queue, bound in config.max_in_flight.items()
        }
    for queue in queues:
        report.published[queue] = _publish(ctx, ready[queue], queue, publish)
    retention.expire_due(ctx, finalize=config.finalize_in_tick)
    if config.finalize_in_tick:
        report.finalized = finalize_ready(ctx)
        retention.delete_due(ctx)
    webhooks.deliver_due(ctx)
    now = time.monotonic()
    if config.gauges_every_s <= 0 or now - config.gauges_refreshed_at >= config.gauges_every_s:
        refresh_gauges(ctx)
        config.gauges_refreshed_at = now
    return report
