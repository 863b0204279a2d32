"""The embedded default's executor loop: run a job's chunks in this process, one at a time,
through the same lease → execute → commit path as the Celery workers."""

from __future__ import annotations

import logging
import os

from service.db import JobState
from service.errors import tenant_reason
from service.executor import PipelineCache, Progress, execute_chunk
from service.jobs import (
    Context,
    claim_chunk,
    job_state,
    maybe_finalize,
    release_chunk,
    requeue_expired,
)
from service.retention import expire_due

log = logging.getLogger(__name__)
STOP_STATES = (JobState.PAUSED, JobState.CANCELLING, JobState.CANCELLED, JobState.EXPIRED)


def run_job(
    ctx: Context,
    job_id: str,
    pipes: PipelineCache,
    *,
    progress: Progress = lambda _finished, _made: None,
) -> str:
    """Run every runnable chunk of `job_id`, then finalise it; returns the job's state. A chunk
    that raises is released as a failed attempt and tried again until max_attempts."""
    owner = f"embedded-{os.uname().nodename}-{os.getpid()}"

    def should_stop() -> bool:
        return job_state(ctx, job_id) in STOP_STATES

    requeue_expired(ctx, job_id)  # a chunk left running by a process that was killed
    while not should_stop():
        expire_due(ctx)  # no dispatcher here: a job past its expires_at stops between chunks
        if should_stop():
            break
        claim = claim_chunk(ctx, owner, job_id=job_id)
        if claim is None:
            break
        try:
            execute_chunk(ctx, claim, pipes, should_stop=should_stop, progress=progress)
        except Exception as exc:  # noqa: BLE001 - recorded on the chunk, retried or dead-lettered
            log.warning("chunk %d of job %s failed", claim.index, job_id, exc_info=True)
            release_chunk(ctx, claim, error=tenant_reason(exc))
        except BaseException:  # Ctrl-C: hand the lease back (not a failed attempt), or the chunk
            release_chunk(ctx, claim)  # would stay leased with no sweeper in embedded mode
            raise
    maybe_finalize(ctx, job_id)
    return job_state(ctx, job_id)
