"""Chunk leases (DESIGN §3): claim, renew, commit, release and sweep, and the job counts they
keep current.

Every time compared with a lease, a backoff or a retry is the database's (`db_now`), so a host
whose clock is off neither loses its leases early nor keeps dead ones. A claim only moves a job
that is still runnable to `running` (a cancel or pause committed meanwhile wins), and a commit
only lands while its lease holds; the commit records the attempt (`output_tag`) whose shard
objects become the chunk's output, so a stale worker's late upload never changes them.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, func, select, update
from sqlalchemy.orm import Session

from service import metrics
from service.context import Context, db_now
from service.db import Chunk, ChunkState, Job, JobState
from service.errors import JobError

log = logging.getLogger(__name__)

RUNNABLE = (JobState.QUEUED, JobState.RUNNING)


@dataclass(frozen=True)
class Claim:
    """A leased chunk: only the holder of `token` may commit it."""

    chunk_id: int
    job_id: str
    index: int
    item_start: int
    item_stop: int
    token: str
    attempt: int
    published_at: datetime | None = None
    tag: str = ""  # this claim's name in its shard objects' keys


def rowcount(result: object) -> int:
    return int(getattr(result, "rowcount", 0) or 0)


def note_received(ctx: Context, chunk_id: int) -> None:
    """The worker task's first act: its message was delivered (DESIGN §3), so the dispatcher
    never re-sends the chunk as lost, whatever it then does with it."""
    with ctx.session() as session:
        session.execute(
            update(Chunk).where(Chunk.id == chunk_id).values(received_at=db_now(session))
        )


def claim_chunk(
    ctx: Context, owner: str, *, job_id: str | None = None, chunk_id: int | None = None
) -> Claim | None:
    """Lease the next pending chunk of a runnable job (oldest job first), or a given chunk."""
    with ctx.session() as session:
        query = (
            select(Chunk)
            .join(Job)
            .where(Chunk.state == ChunkState.PENDING, Job.state.in_(RUNNABLE))
            .order_by(Job.priority.desc(), Job.created_at, Chunk.index)
            .limit(1)
        )
        if job_id is not None:
            query = query.where(Chunk.job_id == job_id)
        if chunk_id is not None:
            query = query.where(Chunk.id == chunk_id)
        if session.bind is not None and session.bind.dialect.name == "postgresql":
            query = query.with_for_update(skip_locked=True, of=Chunk)
        chunk = session.scalar(query)
        if chunk is None:
            return None
        now = db_now(session)
        # conditional on the job's state as it is now, not as the SELECT above saw it: a cancel
        # or pause committed in between must not be overwritten
        started = session.execute(
            update(Job)
            .where(Job.id == chunk.job_id, Job.state.in_(RUNNABLE))
            .values(state=JobState.RUNNING, started_at=func.coalesce(Job.started_at, now))
        )
        if not rowcount(started):
            return None
        chunk.state = ChunkState.RUNNING
        chunk.attempts += 1
        # numbered, not random: two undisturbed runs of a spec name their shards alike (and so
        # write byte-identical manifests), while no two claims of a chunk ever share keys
        chunk.claims += 1
        chunk.lease_owner, chunk.lease_token = owner, str(uuid.uuid4())
        chunk.lease_expires_at = now + timedelta(seconds=ctx.settings.lease_seconds)
        chunk.started_at = now
        return Claim(
            chunk.id,
            chunk.job_id,
            chunk.index,
            chunk.item_start,
            chunk.item_stop,
            chunk.lease_token,
            chunk.attempts,
            chunk.published_at,
            str(chunk.claims),
        )


def _held(claim: Claim) -> tuple[object, ...]:
    return (
        Chunk.id == claim.chunk_id,
        Chunk.lease_token == claim.token,
        Chunk.state == ChunkState.RUNNING,
    )


def renew_lease(ctx: Context, claim: Claim) -> bool:
    with ctx.session() as session:
        expires = db_now(session) + timedelta(seconds=ctx.settings.lease_seconds)
        result = session.execute(
            update(Chunk).where(*_held(claim)).values(lease_expires_at=expires)  # type: ignore[arg-type]
        )
        return bool(rowcount(result))


def commit_chunk(ctx: Context, claim: Claim, done: int, failed: int) -> bool:
    """Mark the chunk done with this attempt's shard as its output, only while this claim still
    holds its lease (so a chunk finished twice commits once). Returns whether it committed."""
    with ctx.session() as session:
        result = session.execute(
            update(Chunk)
            .where(*_held(claim))  # type: ignore[arg-type]
            .values(
                state=ChunkState.DONE,
                output_tag=claim.tag,
                done_items=done,
                failed_items=failed,
                finished_at=db_now(session),
                lease_token=None,
                lease_expires_at=None,
                last_error=None,
            )
        )
        committed = bool(rowcount(result))
    if committed:
        recount(ctx, claim.job_id)
    return committed


def release_chunk(ctx: Context, claim: Claim, error: str | None = None) -> None:
    """Give the lease back without committing: after an error (pending again, or dead after
    max_attempts) or, with no error, because the job was paused or cancelled. The last committed
    attempt (if any) stays the chunk's output."""
    with ctx.session() as session:
        chunk = session.get(Chunk, claim.chunk_id, with_for_update=True)
        if chunk is None or chunk.lease_token != claim.token:
            return
        job_state = session.scalar(select(Job.state).where(Job.id == claim.job_id))
        chunk.lease_token = chunk.lease_owner = chunk.lease_expires_at = None
        chunk.published_at = None  # the dispatcher publishes it again
        if error is None:
            chunk.attempts = max(0, chunk.attempts - 1)  # an interruption is not a failed attempt
            if job_state == JobState.CANCELLING:
                # stopped by the cancel, not failed: an earlier attempt's error (an S3 outage,
                # a lost worker) would otherwise count its items as failed
                chunk.state, chunk.last_error = ChunkState.DEAD, None
            else:
                chunk.state = ChunkState.PENDING
        else:
            chunk.last_error = error[-2000:]
            dead = chunk.attempts >= ctx.settings.max_attempts
            chunk.state = ChunkState.DEAD if dead else ChunkState.PENDING
    recount(ctx, claim.job_id)


def requeue_expired(ctx: Context, job_id: str | None = None) -> int:
    """Running chunks whose lease has expired (their worker died) go back to pending, or dead
    after max_attempts; returns how many were found."""
    with ctx.session() as session:
        query = select(Chunk).where(
            Chunk.state == ChunkState.RUNNING, Chunk.lease_expires_at < db_now(session)
        )
        if job_id is not None:
            query = query.where(Chunk.job_id == job_id)
        expired = session.scalars(query.with_for_update()).all()
        for chunk in expired:
            dead = chunk.attempts >= ctx.settings.max_attempts
            chunk.state = ChunkState.DEAD if dead else ChunkState.PENDING
            chunk.published_at = None
            log.warning("lease of %s on chunk %s expired", chunk.lease_owner, chunk.id)
            chunk.last_error = "worker lost (its lease expired)"
            chunk.lease_owner = chunk.lease_token = chunk.lease_expires_at = None
            metrics.CHUNK_ATTEMPTS.labels("dead" if dead else "expired").inc()
        jobs = {c.job_id for c in expired}
    for job in jobs:
        recount(ctx, job)
    return len(expired)


def job_state(ctx: Context, job_id: str) -> str:
    with ctx.session() as session:
        return str(session.scalar(select(Job.state).where(Job.id == job_id)))


def job_row(ctx: Context, job_id: str) -> Job:
    with ctx.session() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobError(404, f"job {job_id} not found")
        return job


def recount(ctx: Context, job_id: str) -> None:
    """Refresh the job's done/failed counts from its chunks: a chunk counts its committed
    attempt; a dead chunk with none counts all its items as failed."""
    with ctx.session() as session:
        # under the job's row lock: two recounts in turn, so the later write is the fresher
        session.execute(select(Job.id).where(Job.id == job_id).with_for_update())
        done, failed = _counts(session, job_id)
        session.execute(
            update(Job).where(Job.id == job_id).values(done_items=done, failed_items=failed)
        )


def _counts(session: Session, job_id: str) -> tuple[int, int]:
    # a done chunk without a tag was committed by a worker from before tags (a rolling upgrade)
    committed = Chunk.output_tag.is_not(None) | (Chunk.state == ChunkState.DONE)
    # dead of errors with no committed attempt; a chunk stopped by a cancel failed nothing
    uncommitted_dead = (
        (Chunk.state == ChunkState.DEAD)
        & Chunk.output_tag.is_(None)
        & Chunk.last_error.is_not(None)
    )
    done, failed, dead_items = session.execute(
        select(
            func.coalesce(func.sum(case((committed, Chunk.done_items), else_=0)), 0),
            func.coalesce(func.sum(case((committed, Chunk.failed_items), else_=0)), 0),
            func.coalesce(
                func.sum(case((uncommitted_dead, Chunk.item_stop - Chunk.item_start), else_=0)),
                0,
            ),
        ).where(Chunk.job_id == job_id)
    ).one()
    return int(done), int(failed) + int(dead_items)
