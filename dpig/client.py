"""A typed Python client for the dpig HTTP API, built on the CLI's HTTP client
(`cli.client.HttpClient`), so the two cannot drift apart. Jobs come back as `JobView` (the API's
own model); every refusal is a `ClientError` whose message names the field and the problem.

    from dpig.client import Client

    with Client("https://dpig.example.com", api_key="...") as dpig:
        job = dpig.submit({"kind": "sample", "identities": 500, "per_identity": 24})
        for progress in dpig.iter_events(job.id):
            print(progress.done_items, "/", progress.total_items)
        job = dpig.wait(job.id)
        dpig.download(job.id, "virtual-market/")
"""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from cli.client import TERMINAL_STATES, ClientError, HttpClient
from service.jobs import JobView
from service.specs import JobSpec, spec_json

__all__ = ["Client", "ClientError", "JobPage", "JobView", "Output"]


@dataclass(frozen=True)
class Output:
    """One output object of a job: its key under the job's prefix and a (presigned) URL."""

    key: str
    url: str


@dataclass(frozen=True)
class JobPage:
    """One page of `Client.list`: jobs newest first, and the cursor of the next page."""

    jobs: list[JobView]
    next_cursor: str | None


class Client:
    """The HTTP API as Python calls.

    Parameters:
        base_url: the API's URL (default `$DPIG_API_URL`).
        api_key: a tenant's key (default `$DPIG_API_KEY`); a tenant sees only its own jobs.
        timeout: seconds for each request.
    """

    def __init__(
        self, base_url: str | None = None, api_key: str | None = None, *, timeout: float = 30.0
    ) -> None:
        url = base_url or os.environ.get("DPIG_API_URL")
        if not url:
            raise ClientError("base_url: give the API's URL, or set DPIG_API_URL")
        self._http = HttpClient(url, api_key or os.environ.get("DPIG_API_KEY"), timeout=timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def submit(self, spec: JobSpec | dict[str, Any]) -> JobView:
        """Queue a job (a spec model from `service.specs`, or the same as a dict)."""
        data = spec if isinstance(spec, dict) else spec_json(spec)
        return JobView.model_validate(self._http.submit(data, wait=False))

    def get(self, job_id: str, *, full: bool = False) -> JobView:
        """A job; with `full`, its spec too."""
        return JobView.model_validate(self._http.get(job_id, full=full))

    def list(
        self, *, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> JobPage:
        """One page of your jobs, newest first; pass `next_cursor` as `cursor` for the next."""
        jobs, next_cursor = self._http.list_page(state=state, limit=limit, cursor=cursor)
        return JobPage([JobView.model_validate(j) for j in jobs], next_cursor)

    def iter_jobs(self, *, state: str | None = None, page_size: int = 100) -> Iterator[JobView]:
        """Every one of your jobs, newest first, page by page."""
        cursor = None
        while True:
            page = self.list(state=state, limit=page_size, cursor=cursor)
            yield from page.jobs
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def wait(self, job_id: str, *, timeout: float | None = None, interval: float = 1.0) -> JobView:
        """Poll until the job is completed, failed, cancelled or expired; raises TimeoutError
        after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.state in TERMINAL_STATES:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} is still {job.state} after {timeout} s")
            time.sleep(interval)

    def iter_events(self, job_id: str) -> Iterator[JobView]:
        """The job's progress (server-sent events): a view each time it changes, ending after a
        terminal state."""
        for event in self._http.events(job_id):
            yield JobView.model_validate(event)

    def cancel(self, job_id: str) -> JobView:
        return JobView.model_validate(self._http.cancel(job_id))

    def pause(self, job_id: str) -> JobView:
        return JobView.model_validate(self._http.pause(job_id))

    def resume(self, job_id: str) -> JobView:
        return JobView.model_validate(self._http.resume(job_id))

    def retry(self, job_id: str) -> JobView:
        """Run again the chunks that hold failed items."""
        return JobView.model_validate(self._http.retry(job_id))

    def outputs(self, job_id: str) -> builtins.list[Output]:
        """Every output object of the job, in key order, with presigned URLs."""
        return [Output(o["key"], o["url"]) for o in self._http.outputs(job_id)]

    def download(self, job_id: str, out: str | Path) -> int:
        """Copy every output object into `out` with the same layout; returns the bytes copied."""
        root = Path(out)
        total = 0
        for output in self._http.outputs(job_id):
            parts = PurePosixPath(output["key"]).parts
            if not parts or output["key"].startswith("/") or any(p in ("..", ".") for p in parts):
                raise ClientError(f"download: refusing the output key {output['key']!r}")
            total += self._http.fetch(output, root.joinpath(*parts))
        return total
