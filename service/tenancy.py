"""Tenant isolation at submit: where a tenant's job may read sources, and which queue, priority
and chunk size it may ask for (docs/operations.md, "Tenants and limits").

A tenant may name sources under the operator's global prefixes (shared read-only datasets), its
own prefixes (`Settings.tenants`), and its own jobs' outputs. The output store is otherwise never
a source: a URI in it, or one whose listing would cover it, is refused whoever set the prefixes.
The embedded mode has one local user and no server; it may read any local folder.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.db import Job, Tenant
from service.errors import JobError
from service.settings import Settings
from service.specs import JobSpec
from service.storage import SourceLocation, is_within, parse_source_uri

__all__ = ["TenantScope", "check_request", "quota"]

_EMBEDDED_PREFIXES = ["file:///"]


def _resolved(location: str) -> str:
    """A storage location as `parse_source_uri` compares it (local paths symlink-resolved)."""
    if location.startswith("file:"):
        return Path(unquote(urlsplit(location).path)).resolve().as_uri()
    return location


class TenantScope:
    """Source checks for one tenant's submit, inside its database session."""

    def __init__(
        self, settings: Settings, session: Session, tenant: Tenant, *, embedded: bool
    ) -> None:
        self.settings = settings
        self.session = session
        self.tenant = tenant
        self.embedded = embedded
        self._store = _resolved(settings.storage_url)
        self._owned: dict[str, bool] = {}

    @property
    def prefixes(self) -> list[str]:
        """Where this tenant may name sources (the output store is narrowed by `source`)."""
        if self.embedded:
            return list(_EMBEDDED_PREFIXES)
        own = self.settings.policy(self.tenant.name).source_prefixes
        return [*self.settings.allowed_source_prefixes, *own, self.settings.storage_url]

    def _owns(self, job_id: str) -> bool:
        try:
            uuid.UUID(job_id)
        except ValueError:
            return False
        if job_id not in self._owned:
            found = self.session.scalar(
                select(Job.id).where(Job.id == job_id, Job.tenant_id == self.tenant.id)
            )
            self._owned[job_id] = found is not None
        return self._owned[job_id]

    def source(self, uri: str, field: str) -> SourceLocation:
        """The location of `uri` if this tenant may read it, else a 422 naming `field`."""
        try:
            location = parse_source_uri(uri, self.prefixes, field=field)
        except ValueError as exc:
            raise JobError(422, str(exc)) from None
        if self.embedded:
            return location
        if is_within(self._store, location.uri):  # a listing here would cover every tenant
            raise self._in_store(uri, field)
        if is_within(location.uri, self._store):
            parts = location.uri[len(self._store) :].strip("/").split("/")
            if len(parts) < 2 or parts[0] != "jobs" or not self._owns(parts[1]):
                raise self._in_store(uri, field)
        return location

    def _in_store(self, uri: str, field: str) -> JobError:
        # the same answer whether another tenant's job exists there or not
        return JobError(
            422,
            f"{field}: {uri[:300]!r} lies in the output store; a job may read only its own "
            f"tenant's job outputs ({self.settings.storage_url}/jobs/<job id>/)",
        )


def check_request(settings: Settings, tenant: Tenant, spec: JobSpec, *, embedded: bool) -> int:
    """Queue, priority and chunk size against the operator's limits; returns the chunk size."""
    # the operator's own default (DPIG_CHUNK_SIZE) is trusted; a tenant's request is capped
    if spec.chunk_size is not None and spec.chunk_size > settings.max_chunk_size:
        raise JobError(
            422, f"chunk_size: {spec.chunk_size} exceeds the limit of {settings.max_chunk_size}"
        )
    chunk_size = spec.chunk_size or settings.chunk_size
    if embedded:  # one local user: nobody to be fair to
        return chunk_size
    queues = settings.queues(tenant.name)
    if spec.queue not in queues:
        raise JobError(
            422, f"queue: {spec.queue!r} is not allowed for this tenant (allowed: {queues})"
        )
    top = settings.max_priority(tenant.name)
    if spec.priority > top:
        raise JobError(422, f"priority: {spec.priority} exceeds this tenant's maximum of {top}")
    return chunk_size


def quota(value: int | None, default: int) -> int:
    """A tenant's own quota when set (0 included), else the operator's default."""
    return default if value is None else value
