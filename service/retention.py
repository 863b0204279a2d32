"""Job expiry and output retention (docs/jobs.md, "Expiry and retention"): `dpig dispatcher`
marks expired jobs in its tick, and finalises them and deletes expired outputs in its finaliser
thread (both stream or list for minutes on a large job, so neither runs inside a tick).

- A job with `expires_at` that is not finished by then is stopped like a cancel (pending chunks
  never run, running ones stop at their next micro-batch); the finaliser keeps every finished
  shard in a valid manifest, gives the items that were not made the status `expired`, writes
  `_EXPIRED`, and sets the job `expired`.
- A finished job with `retain_days` has its outputs deleted that many days after it finished; the
  job row stays, `deleted`, with `deleted_at`. Nothing but that job's own prefix is deleted.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import select

from service import metrics, webhooks
from service.db import Job, JobState, utcnow
from service.jobs import Context, job_prefix, maybe_finalize  # jobs imports this module lazily
from service.settings import Settings
from service.specs import JobSpec

log = logging.getLogger(__name__)
EXPIRED_ERROR = "expired: not finished before expires_at"
EXPIRABLE = (JobState.QUEUED, JobState.RUNNING, JobState.PAUSED)
RETAINED = (JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED)
BATCH = 100  # jobs per tick and cleaner: a backlog drains over a few ticks


def deadlines(
    spec: JobSpec, settings: Settings, now: datetime
) -> tuple[datetime | None, int | None]:
    """(expires_at, retain_days) of a job submitted `now`: its own, else the operator's."""
    after = spec.expires_after or settings.default_expires_after_s
    retain = spec.retain_days or settings.default_retain_days
    return (None if after is None else now + timedelta(seconds=after)), retain


def expire_due(ctx: Context, now: datetime | None = None, *, finalize: bool = True) -> int:
    """Stop the unfinished jobs whose `expires_at` has passed; returns how many. Each is marked
    `cancelling` with the expiry as its error; with `finalize` it is finalised here when nothing
    of it runs, else a finaliser (`dpig dispatcher`'s thread) ends it `expired`."""
    now = now or utcnow()
    with ctx.session() as session:
        due = session.scalars(
            select(Job.id)
            .where(Job.expires_at <= now, Job.state.in_(EXPIRABLE))
            .order_by(Job.expires_at)
            .limit(BATCH)
        ).all()
    expired = 0
    for job_id in due:
        with ctx.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state not in EXPIRABLE:
                continue  # finished or cancelled meanwhile
            job.state, job.error = JobState.CANCELLING, EXPIRED_ERROR
        expired += 1
        metrics.JOBS_EXPIRED.inc()
        if finalize:
            maybe_finalize(ctx, job_id)  # at once when nothing runs; else once the running stop
    return expired


def delete_due(ctx: Context, now: datetime | None = None) -> int:
    """Delete the outputs of finished jobs past their retention; returns how many jobs."""
    now = now or utcnow()
    with ctx.session() as session:
        rows = session.execute(
            select(Job.id, Job.finished_at, Job.retain_days)
            .where(
                Job.retain_days.is_not(None),
                Job.deleted_at.is_(None),
                Job.state.in_(RETAINED),
                Job.finished_at <= now - timedelta(days=1),  # retain_days ≥ 1: a cheap bound
            )
            .order_by(Job.finished_at)
            .limit(BATCH)
        ).all()
    deleted = 0
    for job_id, finished_at, retain_days in rows:
        assert finished_at is not None and retain_days is not None  # the query's conditions
        if finished_at + timedelta(days=retain_days) > now:
            continue
        ctx.storage.delete_prefix(job_prefix(job_id))  # before the mark: a failure retries
        with ctx.session() as session:
            job = session.get(Job, job_id, with_for_update=True)
            if job is None or job.state not in RETAINED:
                continue
            job.state, job.deleted_at = JobState.DELETED, now
            webhooks.enqueue(session, job)
        deleted += 1
        metrics.JOBS_DELETED.inc()
        log.info("job %s: outputs deleted after %d days", job_id, retain_days)
    return deleted
