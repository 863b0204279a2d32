"""The error the job service answers a refused request with (shared by jobs and tenancy)."""

from __future__ import annotations


class JobError(Exception):
    """A request the job service refuses: `status` is the HTTP status the API answers with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
