"""What `dpig submit`, `watch`, `resume` and `retry` exit with once they have followed a job, so
scripts can branch on the outcome without parsing output (documented in docs/jobs.md)."""

from __future__ import annotations

from typing import Any

OK = 0  # completed, no failed item; or not followed (--detach, API-mode resume/retry)
REFUSED = 2  # bad input: nothing was written (cli.errors.fail)
COMPLETED_WITH_FAILURES = 3
FAILED = 4
CANCELLED = 5
EXPIRED = 6
PAUSED = 7  # followed until it settled, and it settled paused: not finished
INTERRUPTED = 130  # Ctrl-C; the job keeps its finished chunks

_BY_STATE = {"failed": FAILED, "cancelled": CANCELLED, "expired": EXPIRED, "paused": PAUSED}


def for_job(job: dict[str, Any]) -> int:
    """The exit code of a followed job's final view."""
    if job["state"] == "completed":
        return COMPLETED_WITH_FAILURES if job["failed_items"] else OK
    return _BY_STATE.get(job["state"], OK)
