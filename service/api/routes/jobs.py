"""`/v1/jobs`: submit, list, look up, control, outputs and a server-sent progress stream."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response, status
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.exc import SQLAlchemyError
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from service import jobs
from service.api.deps import ContextDep, TenantDep, bearer, lookup_tenant
from service.api.schemas import ErrorBody, JobList, OutputList, OutputObject, error_responses
from service.db import TERMINAL_JOB_STATES, JobState
from service.jobs import Context, JobError, JobView
from service.specs import JobSpec, spec_json
from service.storage import MAX_PRESIGN_SECONDS

EVENT_POLL_S = 0.5
EVENT_RETRY_MS = 2000
EVENT_KEEPALIVE_S = 15.0

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401, 422, 503))

JobId = Annotated[str, Path(description="The job id (a UUID).")]


def _checked_id(job_id: str) -> str:
    """Job ids are UUIDs; anything else is not found (and never reaches SQL)."""
    try:
        uuid.UUID(job_id)
    except ValueError:
        raise JobError(404, f"job {job_id[:100]!r} not found") from None
    return job_id


def _bad_text(value: Any, path: str) -> str | None:
    """The path of the first string that PostgreSQL cannot store (NUL, lone surrogates)."""
    if isinstance(value, str):
        if "\x00" in value:
            return path
        try:
            value.encode()
        except UnicodeEncodeError:
            return path
    elif isinstance(value, dict):
        for key, item in value.items():
            found = _bad_text(key, path) or _bad_text(item, f"{path}.{key}" if path else key)
            if found:
                return found
    elif isinstance(value, list):
        for k, item in enumerate(value):
            if found := _bad_text(item, f"{path}.{k}"):
                return found
    return None


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=JobView,
    responses=error_responses(413, 429),
)
def submit_job(ctx: ContextDep, tenant: TenantDep, spec: JobSpec, response: Response) -> JobView:
    """Submit a job (one of the kinds, chosen by `kind`); it is queued for the workers."""
    if field := _bad_text(spec_json(spec), ""):
        raise JobError(422, f"{field}: NUL or invalid Unicode characters are not allowed")
    view = jobs.submit(ctx, tenant, spec)
    response.headers["Location"] = f"{router.prefix}/{view.id}"
    return view


Cursor = Annotated[
    str | None, Query(max_length=500, description="`next_cursor` of the previous page.")
]
PageSize = Annotated[int, Query(ge=1, le=1000, description="At most this many per page.")]
ViewName = Annotated[
    Literal["basic", "full"], Query(description="`full` adds the job's spec (up to 1 MB).")
]


@router.get("", response_model=JobList)
def list_jobs(
    ctx: ContextDep,
    tenant: TenantDep,
    state: Annotated[JobState | None, Query(description="Only jobs in this state.")] = None,
    limit: PageSize = 50,
    cursor: Cursor = None,
) -> JobList:
    """A page of this tenant's jobs, newest first, without their specs."""
    found, next_cursor = jobs.list_jobs(ctx, tenant, state=state, limit=limit, cursor=cursor)
    return JobList(data=found, count=len(found), next_cursor=next_cursor)


@router.get(
    "/{job_id}",
    response_model=JobView,
    responses=error_responses(404),
)
def get_job(ctx: ContextDep, tenant: TenantDep, job_id: JobId, view: ViewName = "basic") -> JobView:
    """One job: state, item counts, throughput, ETA and output URI (and its spec with
    `view=full`)."""
    return jobs.get_job(ctx, tenant, _checked_id(job_id), full=view == "full")


@router.post("/{job_id}:cancel", response_model=JobView, responses=error_responses(404, 409))
def cancel_job(ctx: ContextDep, tenant: TenantDep, job_id: JobId) -> JobView:
    """Cancel: pending chunks never run; finished shards are kept in a valid manifest."""
    return jobs.cancel(ctx, tenant, _checked_id(job_id))


@router.post("/{job_id}:pause", response_model=JobView, responses=error_responses(404, 409))
def pause_job(ctx: ContextDep, tenant: TenantDep, job_id: JobId) -> JobView:
    """Pause a queued or running job: no more chunks are dispatched."""
    return jobs.pause(ctx, tenant, _checked_id(job_id))


@router.post("/{job_id}:resume", response_model=JobView, responses=error_responses(404, 409))
def resume_job(ctx: ContextDep, tenant: TenantDep, job_id: JobId) -> JobView:
    """Resume a paused job."""
    return jobs.resume(ctx, tenant, _checked_id(job_id))


@router.post("/{job_id}:retry", response_model=JobView, responses=error_responses(404, 409))
def retry_job(ctx: ContextDep, tenant: TenantDep, job_id: JobId) -> JobView:
    """Run again the chunks of a finished job that hold failed items."""
    return jobs.retry(ctx, tenant, _checked_id(job_id))


@router.get("/{job_id}/outputs", response_model=OutputList, responses=error_responses(404))
def job_outputs(
    ctx: ContextDep,
    tenant: TenantDep,
    job_id: JobId,
    expires_in: Annotated[
        int, Query(ge=1, le=MAX_PRESIGN_SECONDS, description="URL lifetime in seconds.")
    ] = 3600,
    limit: PageSize = 1000,
    cursor: Cursor = None,
) -> OutputList:
    """A page of the job's output objects, in key order, each with a presigned GET URL."""
    found, next_cursor = jobs.outputs(
        ctx, tenant, _checked_id(job_id), expires_s=expires_in, limit=limit, cursor=cursor
    )
    return OutputList(
        data=[OutputObject(**item) for item in found],
        count=len(found),
        expires_in=expires_in,
        next_cursor=next_cursor,
    )


def _event(name: str, data: str) -> str:
    return f"event: {name}\ndata: {data}\n\n"


class StreamSlots:
    """Open event streams per tenant in this API process, against `max_event_streams_per_tenant`
    (streams run on the event loop, so plain counting is race-free)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open: dict[int, int] = {}

    def take(self, tenant: int) -> None:
        if self.open.get(tenant, 0) >= self.limit:
            raise JobError(
                429,
                f"events: {self.limit} event streams are already open for this tenant (the limit)",
            )
        self.open[tenant] = self.open.get(tenant, 0) + 1

    def give_back(self, tenant: int) -> None:
        self.open[tenant] -= 1
        if not self.open[tenant]:
            del self.open[tenant]


def _slots(request: Request) -> StreamSlots:
    state = request.app.state
    if getattr(state, "stream_slots", None) is None:
        state.stream_slots = StreamSlots(state.settings.max_event_streams_per_tenant)
    slots: StreamSlots = state.stream_slots
    return slots


class _SlotStream(StreamingResponse):
    """A stream that gives its tenant's slot back however the response ends, including a client
    that is gone before the body starts (then the body generator never runs, nor its finally)."""

    def __init__(self, content: AsyncIterator[str], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


async def _progress_events(
    ctx: Context, tenant: int, key: str, job_id: str, view: JobView
) -> AsyncIterator[str]:
    """The job's view (counts and state, never the spec) each time it changes; the stream ends
    at a terminal state, or when the key that opened it is revoked."""
    yield f"retry: {EVENT_RETRY_MS}\n\n"
    last, quiet = "", 0.0
    while True:
        payload = view.model_dump_json()
        if payload != last:
            yield _event("progress", payload)
            last, quiet = payload, 0.0
        if view.state in TERMINAL_JOB_STATES:
            return
        if quiet >= EVENT_KEEPALIVE_S:  # a comment line keeps proxies from closing the stream
            yield ": keep-alive\n\n"
            quiet = 0.0
        await anyio.sleep(EVENT_POLL_S)
        quiet += EVENT_POLL_S
        try:
            if await run_in_threadpool(lookup_tenant, ctx, key) != tenant:
                yield _event("error", ErrorBody(detail="API key revoked").model_dump_json())
                return
            view = await run_in_threadpool(jobs.get_job, ctx, tenant, job_id)
        except (JobError, SQLAlchemyError) as exc:
            message = exc.message if isinstance(exc, JobError) else "database unavailable"
            yield _event("error", ErrorBody(detail=message).model_dump_json())
            return


@router.get(
    "/{job_id}/events",
    response_class=StreamingResponse,
    responses={
        200: {
            "description": "`text/event-stream`: a `progress` event (the job's counts and state "
            "as JSON, without its spec) whenever it changes, ending after a terminal state or "
            "when the API key is revoked.",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(404, 429),
    },
)
async def job_events(
    ctx: ContextDep,
    tenant: TenantDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    request: Request,
    job_id: JobId,
) -> StreamingResponse:
    """Server-sent progress events until the job is completed, failed or cancelled."""
    view = await run_in_threadpool(jobs.get_job, ctx, tenant, _checked_id(job_id))
    assert credentials is not None  # TenantDep has refused requests without a key
    slots = _slots(request)
    slots.take(tenant)
    return _SlotStream(
        _progress_events(ctx, tenant, credentials.credentials, job_id, view),
        release=lambda: slots.give_back(tenant),
    )
