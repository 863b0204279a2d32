"""Job logic shared by the API, the workers and the embedded CLI: models, tenants, submit, look
up and control (DESIGN §3). Chunk leases live in `service.chunks`, the finaliser in
`service.finalize`; both are re-exported here for callers.

PostgreSQL (or SQLite in embedded mode) is the source of truth. Nothing per item is stored: a job
is one row plus one row per chunk, and its inputs (the spec and the frozen, sorted list of source
images) are written once to storage at submit.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from pydantic import BaseModel, Field
from sqlalchemy import Table, func, select, tuple_, update
from sqlalchemy.orm import Session, defer

from service import webhooks

# re-exported: callers import these from here
from service.chunks import Claim as Claim
from service.chunks import claim_chunk as claim_chunk
from service.chunks import commit_chunk as commit_chunk
from service.chunks import job_row as job_row
from service.chunks import job_state as job_state
from service.chunks import recount
from service.chunks import release_chunk as release_chunk
from service.chunks import renew_lease as renew_lease
from service.chunks import requeue_expired as requeue_expired
from service.context import HEAD_REVISION as HEAD_REVISION
from service.context import Context as Context
from service.context import open_context as open_context
from service.db import (
    TERMINAL_JOB_STATES,
    Chunk,
    ChunkState,
    Job,
    JobState,
    RegisteredModel,
    Tenant,
    utcnow,
)
from service.errors import JobError as JobError
from service.finalize import job_prefix as job_prefix
from service.finalize import maybe_finalize as maybe_finalize
from service.settings import Settings
from service.source_checks import check_source_custom_ids, check_source_poses
from service.specs import JobSpec, PoseGridSpec, spec_json, spec_sha256
from service.storage import (
    ImageSource,
    ListingTooLarge,
    SourceLocation,
    StorageError,
    storage_from_url,
)
from service.tenancy import TenantScope, check_request, quota

log = logging.getLogger(__name__)
DEFAULT_TENANT = "local"
ACTIVE_STATES = (
    JobState.QUEUED,
    JobState.RUNNING,
    JobState.FINALIZING,
    JobState.PAUSED,
    JobState.CANCELLING,
)


# ------------------------------------------------------------------------------------------------
# models


@dataclass(frozen=True)
class ModelInfo:
    name: str
    path: Path
    weights_sha256: str
    version: str
    config: dict[str, Any]


def bundled_model_dir() -> Path:
    return Path(__file__).resolve().parents[1] / "models" / "dpig-market-small-synth"


def _model_from_folder(name: str, folder: Path) -> ModelInfo:
    """Read a weights folder's manifest and config (plain JSON: submitting must not import
    torch); the hashes themselves are verified when a worker loads the weights."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        config = json.loads((folder / "config.json").read_text())
        sha = str(manifest["files"]["model.safetensors"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise JobError(
            422, f"model: {name!r} at {folder} is not a weights folder ({exc})"
        ) from None
    return ModelInfo(name, folder, sha, str(manifest.get("version", "")), config)


def resolve_model(ctx: Context, name: str) -> ModelInfo:
    """'default' is the bundled model (or $DPIG_MODEL); other names must be registered."""
    import os

    if name == "default":
        return _model_from_folder(name, Path(os.environ.get("DPIG_MODEL", bundled_model_dir())))
    with ctx.session() as session:
        row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if row is None:
            raise JobError(422, f"model: unknown model {name!r} (see `dpig models list`)")
        return _model_from_folder(name, Path(row.uri.removeprefix("file://")))


def register_model(ctx: Context, name: str, folder: Path) -> ModelInfo:
    """Record a weights folder (verified against its manifest) under `name`."""
    from dpig_core.weights import WeightsError, verify

    if name == "default":
        raise JobError(422, "name: 'default' is reserved for the bundled model")
    try:
        verify(folder)
    except (WeightsError, OSError) as exc:
        raise JobError(422, f"path: {exc}") from None
    info = _model_from_folder(name, folder.resolve())
    with ctx.session() as session:
        row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
        if row is None:
            row = RegisteredModel(name=name)
            session.add(row)
        row.version, row.uri = info.version, str(info.path)
        row.weights_sha256, row.config = info.weights_sha256, info.config
    return info


def list_models(ctx: Context) -> list[dict[str, Any]]:
    """The bundled default, then every registered model by name."""
    out = [model_view(resolve_model(ctx, "default"))]
    with ctx.session() as session:
        for row in session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)):
            info = ModelInfo(row.name, Path(row.uri), row.weights_sha256, row.version, row.config)
            out.append(model_view(info))
    return out


def model_view(info: ModelInfo, *, with_config: bool = False) -> dict[str, Any]:
    view = {
        "name": info.name,
        "version": info.version,
        "path": str(info.path),
        "weights_sha256": info.weights_sha256,
        "resolution": f"{info.config.get('height')}x{info.config.get('width')}",
    }
    return view | ({"config": info.config} if with_config else {})


# ------------------------------------------------------------------------------------------------
# tenants


def tenant_id(ctx: Context, name: str = DEFAULT_TENANT) -> int:
    """The id of tenant `name`, created on first use (the embedded default has one tenant)."""
    with ctx.session() as session:
        found = session.scalar(select(Tenant.id).where(Tenant.name == name))
        if found is not None:
            return int(found)
        tenant = Tenant(name=name)
        session.add(tenant)
        session.flush()
        return int(tenant.id)


# ------------------------------------------------------------------------------------------------
# views


class JobView(BaseModel):
    """A job as the API returns it (and `--json` prints it)."""

    id: str
    kind: str
    state: str
    model: str
    total_items: int
    done_items: int
    failed_items: int
    running_items: int
    images_per_second: float | None
    eta_seconds: float | None
    output_uri: str | None
    error: str | None
    queue: str
    priority: int
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    expires_at: datetime | None = Field(
        default=None, description="Not finished by then: `expired` (null: never)."
    )
    retain_days: int | None = Field(
        default=None, description="Outputs are deleted this many days after finishing."
    )
    deleted_at: datetime | None = Field(default=None, description="When retention deleted them.")
    spec: dict[str, Any] | None = Field(
        default=None, description="The job's spec: only in the full view (`?view=full`)."
    )


def _view(job: Job, running_items: int, *, full: bool = False) -> JobView:
    rate = eta = None
    finished = job.done_items + job.failed_items
    if job.started_at is not None and finished:
        end = job.finished_at or utcnow()
        seconds = max((end - job.started_at).total_seconds(), 1e-3)
        rate = round(job.done_items / seconds, 2)  # images made: a failed item is no image
        if job.state not in TERMINAL_JOB_STATES:
            eta = round((job.total_items - finished) * seconds / finished, 1)
    return JobView(
        id=job.id,
        kind=job.kind,
        state=job.state,
        model=job.model_name,
        total_items=job.total_items,
        done_items=job.done_items,
        failed_items=job.failed_items,
        running_items=running_items,
        images_per_second=rate,
        eta_seconds=eta,
        output_uri=job.output_uri,
        error=job.error,
        queue=job.queue,
        priority=job.priority,
        created_at=job.created_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        expires_at=job.expires_at,
        retain_days=job.retain_days,
        deleted_at=job.deleted_at,
        spec=job.spec if full else None,
    )


def _running_items(session: Session, job_id: str) -> int:
    return _running_by_job(session, [job_id]).get(job_id, 0)


def _running_by_job(session: Session, job_ids: list[str]) -> dict[str, int]:
    """Items in running chunks, per job: one query for a whole page of jobs."""
    rows = session.execute(
        select(Chunk.job_id, func.sum(Chunk.item_stop - Chunk.item_start))
        .where(Chunk.job_id.in_(job_ids), Chunk.state == ChunkState.RUNNING)
        .group_by(Chunk.job_id)
    ).all()
    return {job_id: int(total or 0) for job_id, total in rows}


def _job(session: Session, tenant: int, job_id: str, *, lock: bool = False) -> Job:
    query = select(Job).where(Job.id == job_id, Job.tenant_id == tenant)
    if lock:
        query = query.with_for_update()
    job = session.scalar(query)
    if job is None:
        raise JobError(404, f"job {job_id} not found")
    return job


def get_job(ctx: Context, tenant: int, job_id: str, *, full: bool = False) -> JobView:
    """One job; its spec (up to the body limit) only when `full`."""
    with ctx.session() as session:
        query = select(Job).where(Job.id == job_id, Job.tenant_id == tenant)
        job = session.scalar(query if full else query.options(defer(Job.spec)))
        if job is None:
            raise JobError(404, f"job {job_id} not found")
        return _view(job, _running_items(session, job.id), full=full)


def _encode_cursor(*parts: str) -> str:
    return base64.urlsafe_b64encode("\n".join(parts).encode()).decode().rstrip("=")


def _decode_cursor(cursor: str, count: int) -> list[str]:
    try:
        parts = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode().split("\n")
    except (ValueError, UnicodeDecodeError):
        parts = []
    if len(parts) != count:
        raise JobError(422, "cursor: not a cursor this service returned")
    return parts


def list_jobs(
    ctx: Context,
    tenant: int,
    *,
    state: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> tuple[list[JobView], str | None]:
    """A page of this tenant's jobs, newest first (without specs), and the cursor of the next
    page (None on the last)."""
    query = select(Job).options(defer(Job.spec)).where(Job.tenant_id == tenant)
    if state is not None:
        query = query.where(Job.state == state)
    if cursor:
        created, job_id = _decode_cursor(cursor, 2)
        try:
            after = datetime.fromisoformat(created)
        except ValueError:
            raise JobError(422, "cursor: not a cursor this service returned") from None
        query = query.where(tuple_(Job.created_at, Job.id) < tuple_(after, job_id))
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    with ctx.session() as session:
        found = session.scalars(query).all()
        page = found[:limit]
        running = _running_by_job(session, [job.id for job in page])
        views = [_view(job, running.get(job.id, 0)) for job in page]
    more = len(found) > limit
    last = page[-1] if page else None
    next_cursor = (
        _encode_cursor(last.created_at.isoformat(), last.id) if more and last is not None else None
    )
    return views, next_cursor


# ------------------------------------------------------------------------------------------------
# submit


def _sources(ctx: Context, location: SourceLocation, spec: PoseGridSpec) -> list[str]:
    """The sorted source images of a pose grid; the listing stops at `max_sources`, and a
    folder with more than `max_source_images` images (or `max_listed_objects` objects) is
    refused rather than listed whole."""
    cap = ctx.settings.max_source_images
    wanted = spec.max_sources or cap + 1
    source = ImageSource(location, storage_from_url(location.storage_url, ctx.settings))
    try:
        keys = source.keys(limit=wanted, max_scanned=ctx.settings.max_listed_objects)
    except ListingTooLarge as exc:
        raise JobError(422, f"images: {exc}") from None
    except StorageError as exc:
        log.warning("listing %s failed: %s", spec.images, exc)
        raise JobError(422, f"images: cannot list {spec.images[:300]!r}") from None
    if not keys:
        raise JobError(422, f"images: no images found at {spec.images[:300]!r}")
    if unaddressable := next((key for key in keys if "#" in key or "?" in key), None):
        # item URIs are the prefix plus the key: '#' and '?' would start a fragment or a query
        raise JobError(
            422, f"images: {unaddressable[:200]!r} has '#' or '?' in its name; rename it"
        )
    if len(keys) > cap:
        raise JobError(
            422,
            f"images: more than {cap} images under {spec.images[:300]!r}; "
            f"give max_sources (at most {cap}) or a narrower prefix",
        )
    return keys


def total_items(spec: JobSpec, sources: list[str] | None) -> int:
    if spec.kind == "sample":
        return spec.total
    if spec.kind == "pose_grid":
        assert sources is not None
        return len(sources) * len(spec.poses)
    if spec.kind == "swap":
        return len(spec.items)
    return len(spec.pairs) * spec.steps


# Fields that hold only numbers: a pose grid can carry 10^4 poses, not worth walking.
_NO_IMAGES = frozenset({"poses", "source_keypoints", "keypoints"})


def _image_uris(data: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """(field path, uri) of every image reference in a spec's JSON form."""
    if isinstance(data, dict):
        for key, value in data.items():
            if key in _NO_IMAGES:
                continue
            where = f"{path}.{key}" if path else str(key)
            if key == "uri" and isinstance(value, str):
                yield where, value
            else:
                yield from _image_uris(value, where)
    elif isinstance(data, list):
        for k, value in enumerate(data):
            yield from _image_uris(value, f"{path}.{k}")


def _check_image_uris(scope: TenantScope, data: dict[str, Any]) -> None:
    """Image references (swap, interpolate, fixed factors) must be readable by the tenant,
    checked at submit so that a bad URI refuses the job instead of failing its items."""
    for field, uri in _image_uris(data):
        scope.source(uri, field)


def _check_quota(session: Session, tenant: Tenant, limit: int, *, lock: bool) -> None:
    """429 when the tenant has `limit` active jobs. With `lock`, the tenant's row stays locked
    until the caller's transaction ends, so concurrent submits count one after the other."""
    if lock:
        session.execute(select(Tenant.id).where(Tenant.id == tenant.id).with_for_update())
    active = session.scalar(
        select(func.count())
        .select_from(Job)
        .where(Job.tenant_id == tenant.id, Job.state.in_(ACTIVE_STATES))
    )
    if (active or 0) >= limit:
        raise JobError(429, f"quota: {active} active jobs, the limit is {limit}")


def submit(ctx: Context, tenant: int, spec: JobSpec) -> JobView:
    """Validate against the model and the quotas, freeze the inputs, and create the job and its
    chunks. Nothing is written when the job is refused."""
    model = resolve_model(ctx, spec.model)
    data = spec_json(spec)
    settings = ctx.settings
    webhooks.check_submit(settings, tenant, spec.callback_url)  # resolves the host: no session
    with ctx.session() as session:
        tenant_row = session.get(Tenant, tenant)
        if tenant_row is None:
            raise JobError(404, "tenant not found")
        chunk_size = check_request(settings, tenant_row, spec, embedded=ctx.embedded)
        max_active = quota(tenant_row.max_active_jobs, settings.max_active_jobs)
        max_items = quota(tenant_row.max_items_per_job, settings.max_items_per_job)
        # before any listing: a tenant over its quota costs nothing more
        _check_quota(session, tenant_row, max_active, lock=False)
        scope = TenantScope(settings, session, tenant_row, embedded=ctx.embedded)
        _check_image_uris(scope, data)
        location = scope.source(spec.images, "images") if spec.kind == "pose_grid" else None
        session.expunge(tenant_row)
    sources = None
    if spec.kind == "pose_grid":
        assert location is not None
        sources = _sources(ctx, location, spec)
        check_source_poses(spec, sources, settings)
        check_source_custom_ids(spec, sources)
    total = total_items(spec, sources)
    if total > max_items:
        raise JobError(422, f"total_items: {total} items exceed the quota of {max_items}")
    from service.retention import deadlines

    expires_at, retain_days = deadlines(spec, settings, utcnow())
    chunks = -(-total // chunk_size)
    if chunks > settings.max_chunks_per_job:
        raise JobError(
            422,
            f"chunk_size: {total} items in chunks of {chunk_size} make {chunks} "
            f"chunks; at most {settings.max_chunks_per_job} per job",
        )
    job = Job(
        tenant_id=tenant,
        kind=spec.kind,
        queue=spec.queue,
        priority=spec.priority,
        spec=data,
        spec_sha256=spec_sha256(data),
        model_name=model.name,
        weights_sha256=model.weights_sha256,
        seed=spec.seed,
        total_items=total,
        chunk_size=chunk_size,
        expires_at=expires_at,
        retain_days=retain_days,
        execution=execution_of(ctx.settings),
    )
    from service.db import new_id

    job.id = new_id()
    prefix = job_prefix(job.id)
    job.output_uri = ctx.storage.root_url.rstrip("/") + "/" + prefix
    manifest = {
        "job_id": job.id,
        "kind": spec.kind,
        "spec": job.spec,
        "spec_sha256": job.spec_sha256,
        "model": {
            "name": model.name,
            "version": model.version,
            "weights_sha256": model.weights_sha256,
        },
        "total_items": total,
        "chunk_size": chunk_size,
        "execution": job.execution,
        "code_version": _code_version(),
    }
    try:
        if sources is not None:
            ctx.storage.put_bytes(prefix + "inputs/sources.json", json.dumps(sources).encode())
        # compact: an indented dump runs in pure Python and dominated the submit time
        ctx.storage.put_bytes(prefix + "job.json", json.dumps(manifest).encode())
        with ctx.session() as session:
            _check_quota(session, tenant_row, max_active, lock=True)
            session.add(job)
            session.flush()
            session.execute(
                cast(
                    Table, Chunk.__table__
                ).insert(),  # Core executemany: no ORM bookkeeping per row
                [
                    {
                        "job_id": job.id,
                        "index": k,
                        "item_start": start,
                        "item_stop": min(start + chunk_size, total),
                    }
                    for k, start in enumerate(range(0, total, chunk_size))
                ],
            )
    except Exception:
        if not _job_exists(ctx, job.id):  # an ambiguous commit may have applied: keep its inputs
            ctx.storage.delete_prefix(prefix)
        raise
    return _view(job, 0)


def _job_exists(ctx: Context, job_id: str) -> bool:
    """Whether the job row is there; when the database cannot say, assume it is (leftover
    inputs cost a little storage, deleted inputs break a live job)."""
    try:
        with ctx.session() as session:
            return session.get(Job, job_id) is not None
    except Exception:  # noqa: BLE001 - the database is unreachable
        return True


def execution_of(settings: Settings) -> dict[str, Any]:
    """How a job's items are made, fixed at submit from the operator's settings: the pixels
    depend on the micro-batch size, the precision and the device class."""
    device = settings.device.split(":")[0] if settings.device else None
    return {"batch_size": settings.batch_size, "precision": settings.precision, "device": device}


def _code_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpig")
    except PackageNotFoundError:
        return "unknown"


def read_sources(ctx: Context, job_id: str) -> list[str]:
    data: list[str] = json.loads(ctx.storage.get_bytes(job_prefix(job_id) + "inputs/sources.json"))
    return data


# ------------------------------------------------------------------------------------------------
# control


def _set_state(
    ctx: Context, tenant: int, job_id: str, allowed: dict[str, str], verb: str
) -> JobView:
    with ctx.session() as session:
        job = _job(session, tenant, job_id, lock=True)
        if job.state not in allowed:
            raise JobError(409, f"cannot {verb} a job that is {job.state}")
        job.state = allowed[job.state]
        return _view(job, _running_items(session, job.id))


def cancel(ctx: Context, tenant: int, job_id: str) -> JobView:
    """Mark the job `cancelling`: pending chunks never run, running ones stop at their next
    micro-batch, and the finaliser (the dispatcher's, or the embedded runner's) then keeps every
    finished shard in a valid manifest and ends it `cancelled`. Nothing is finalised here, so a
    request never holds a job's whole manifest."""
    return _set_state(
        ctx,
        tenant,
        job_id,
        dict.fromkeys((JobState.QUEUED, JobState.RUNNING, JobState.PAUSED), JobState.CANCELLING),
        "cancel",
    )


def pause(ctx: Context, tenant: int, job_id: str) -> JobView:
    return _set_state(
        ctx,
        tenant,
        job_id,
        {JobState.QUEUED: JobState.PAUSED, JobState.RUNNING: JobState.PAUSED},
        "pause",
    )


def resume(ctx: Context, tenant: int, job_id: str) -> JobView:
    """Queue a paused job again. Messages published before the pause were skipped by the
    workers, so its pending chunks count as unpublished: the dispatcher sends them at once instead
    of after its lost-message delay (a leftover duplicate message is harmless)."""
    view = _set_state(ctx, tenant, job_id, {JobState.PAUSED: JobState.QUEUED}, "resume")
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state == ChunkState.PENDING)
            .values(published_at=None)
        )
    return view


def retry(ctx: Context, tenant: int, job_id: str) -> JobView:
    """Run again the chunks that hold failed items (or failed as a whole). Items that succeeded
    before come out byte-identical, so re-running whole chunks equals re-running failed items."""
    with ctx.session() as session:
        job = _job(session, tenant, job_id, lock=True)
        if job.state not in (JobState.COMPLETED, JobState.FAILED):
            raise JobError(409, f"cannot retry a job that is {job.state}")
        result = session.execute(
            update(Chunk)
            .where(
                Chunk.job_id == job.id,
                (Chunk.failed_items > 0) | Chunk.state.in_((ChunkState.FAILED, ChunkState.DEAD)),
            )
            # the last committed attempt (output_tag) stays the chunk's output until a new one
            # commits; published_at is cleared so the bounded publisher sends it, not the
            # lost-message sweep
            .values(state=ChunkState.PENDING, attempts=0, last_error=None, published_at=None)
        )
        if not result.rowcount:  # type: ignore[attr-defined]
            raise JobError(409, "the job has no failed items to retry")
        job.state, job.finished_at, job.error = JobState.QUEUED, None, None
    for marker in ("_SUCCESS", "_FAILED", "_CANCELLED"):
        ctx.storage.delete_prefix(job_prefix(job_id) + marker)
    recount(ctx, job_id)
    return get_job(ctx, tenant, job_id)


def outputs(
    ctx: Context,
    tenant: int,
    job_id: str,
    expires_s: int = 3600,
    *,
    limit: int = 1000,
    cursor: str | None = None,
) -> tuple[list[dict[str, str]], str | None]:
    """A page of a job's output objects, in key order, each with a presigned (S3) or file://
    URL, and the cursor of the next page (None on the last)."""
    get_job(ctx, tenant, job_id)
    if expires_s > ctx.settings.max_presign_seconds:
        raise JobError(
            422,
            f"expires_in: {expires_s} s exceeds the limit of {ctx.settings.max_presign_seconds} s",
        )
    prefix = job_prefix(job_id)
    after = prefix + _decode_cursor(cursor, 1)[0] if cursor else ""
    keys = ctx.storage.page(prefix, limit + 1, start_after=after)
    page = keys[:limit]
    found = [
        {"key": key.removeprefix(prefix), "url": ctx.storage.presigned_url(key, expires_s)}
        for key in page
    ]
    more = len(keys) > limit
    return found, _encode_cursor(found[-1]["key"]) if more and found else None
