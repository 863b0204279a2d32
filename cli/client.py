"""How the CLI reaches the job service: in-process (the embedded default) or over HTTP.

`get_client()` returns an `HttpClient` when `DPIG_API_URL` is set, else an `EmbeddedClient`. Both
implement `JobClient` and return jobs as the API returns them (the `JobView` fields, JSON-ready);
every refusal is a `ClientError` whose message is one line naming the field and the problem.

Embedded mode needs no server: SQLite and a local output folder under `DPIG_HOME`, and jobs run
in this process (`run`), through the same lease → execute → commit path as the Celery workers.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

if TYPE_CHECKING:
    import httpx

    from service.executor import PipelineCache
    from service.jobs import Context

Progress = Callable[[int, int], None]  # (items finished, images made) since the last call
TERMINAL_STATES = ("completed", "failed", "cancelled", "expired", "deleted")
SETTLED_STATES = (*TERMINAL_STATES, "paused")  # states in which nothing happens by itself


class ClientError(Exception):
    """A request the service refused, or could not be sent: one line for the user."""


class JobClient(Protocol):
    """What the CLI asks of the job service; jobs are JobView-shaped dicts."""

    mode: str  # "embedded" or "http"

    def submit(
        self, spec: dict[str, Any], *, wait: bool = True, progress: Progress | None = None
    ) -> dict[str, Any]: ...
    def get(self, job_id: str, *, full: bool = False) -> dict[str, Any]: ...
    def list_jobs(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]: ...
    def cancel(self, job_id: str) -> dict[str, Any]: ...
    def pause(self, job_id: str) -> dict[str, Any]: ...
    def resume(self, job_id: str) -> dict[str, Any]: ...
    def retry(self, job_id: str) -> dict[str, Any]: ...
    def outputs(self, job_id: str) -> list[dict[str, str]]: ...
    def models(self) -> list[dict[str, Any]]: ...
    def model_info(self, name: str) -> dict[str, Any]: ...
    def register_model(self, name: str, folder: Path) -> dict[str, Any]: ...
    def can_run(self, job: dict[str, Any]) -> bool: ...
    def pending_items(self, job_id: str) -> int: ...
    def run(self, job_id: str, *, progress: Progress | None = None) -> dict[str, Any]: ...
    def fetch(self, output: dict[str, str], target: Path) -> int: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------------------------------------
# embedded


@contextmanager
def _job_errors() -> Iterator[None]:
    """JobError and pydantic errors → ClientError (one line)."""
    from pydantic import ValidationError

    from service.jobs import JobError
    from service.specs import describe_errors

    try:
        yield
    except JobError as exc:
        raise ClientError(exc.message) from None
    except ValidationError as exc:
        raise ClientError(describe_errors(exc)) from None


class EmbeddedClient:
    """No servers: the job tables in SQLite (or `DPIG_DATABASE_URL`) and outputs under
    `DPIG_STORAGE_URL` (default `$DPIG_HOME/outputs`); jobs run in this process."""

    mode = "embedded"

    def __init__(self) -> None:
        from service.settings import get_settings

        self.settings = get_settings()
        self._ctx: Context | None = None
        self._tenant: int | None = None
        self._pipes: PipelineCache | None = None

    @property
    def ctx(self) -> Context:
        if self._ctx is None:
            from service.jobs import open_context, tenant_id
            from service.retention import delete_due, expire_due
            from service.webhooks import deliver_due

            self.settings.ensure_dirs()
            self._ctx = open_context(self.settings, embedded=True)
            self._tenant = tenant_id(self._ctx)
            expire_due(self._ctx)  # no dispatcher here: the cleaners run when the CLI starts
            delete_due(self._ctx)
            deliver_due(self._ctx)
        return self._ctx

    @property
    def tenant(self) -> int:
        self.ctx  # noqa: B018 - opens the context, which looks the tenant up
        assert self._tenant is not None
        return self._tenant

    @property
    def pipes(self) -> PipelineCache:
        if self._pipes is None:
            from service.executor import PipelineCache

            # a job runs with its own micro-batch size and precision (fixed at submit from
            # DPIG_BATCH_SIZE / DPIG_PRECISION); these are only the defaults for older jobs
            self._pipes = PipelineCache(
                device=self.settings.device or "cpu", batch_size=self.settings.batch_size
            )
        return self._pipes

    @staticmethod
    def _dump(view: Any) -> dict[str, Any]:
        data: dict[str, Any] = view.model_dump(mode="json")
        return data

    def submit(
        self, spec: dict[str, Any], *, wait: bool = True, progress: Progress | None = None
    ) -> dict[str, Any]:
        from service import jobs
        from service.specs import parse_spec

        with _job_errors():
            view = jobs.submit(self.ctx, self.tenant, parse_spec(spec))
        if not wait:
            return self._dump(view)
        return self.run(view.id, progress=progress)

    def get(self, job_id: str, *, full: bool = False) -> dict[str, Any]:
        from service import jobs

        with _job_errors():
            return self._dump(jobs.get_job(self.ctx, self.tenant, job_id, full=full))

    def list_jobs(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        from service import jobs

        with _job_errors():
            views, _ = jobs.list_jobs(self.ctx, self.tenant, state=state, limit=limit)
        return [self._dump(v) for v in views]

    def _control(self, verb: str, job_id: str) -> dict[str, Any]:
        from service import jobs

        with _job_errors():
            return self._dump(getattr(jobs, verb)(self.ctx, self.tenant, job_id))

    def cancel(self, job_id: str) -> dict[str, Any]:
        from service import jobs

        with _job_errors():
            jobs.cancel(self.ctx, self.tenant, job_id)
            # no dispatcher here: this process finalises a job with nothing running (one still
            # running in another `dpig run` is finalised by that runner when its chunk stops)
            jobs.maybe_finalize(self.ctx, job_id)
            return self._dump(jobs.get_job(self.ctx, self.tenant, job_id))

    def pause(self, job_id: str) -> dict[str, Any]:
        return self._control("pause", job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._control("resume", job_id)

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._control("retry", job_id)

    def outputs(self, job_id: str) -> list[dict[str, str]]:
        from service import jobs

        out: list[dict[str, str]] = []
        cursor = None
        with _job_errors():
            while True:
                page, cursor = jobs.outputs(self.ctx, self.tenant, job_id, cursor=cursor)
                out += page
                if cursor is None:
                    return out

    def models(self) -> list[dict[str, Any]]:
        from service import jobs

        with _job_errors():
            return jobs.list_models(self.ctx)

    def model_info(self, name: str) -> dict[str, Any]:
        from service import jobs

        with _job_errors():
            info = jobs.resolve_model(self.ctx, name)
        return jobs.model_view(info, with_config=True)

    def register_model(self, name: str, folder: Path) -> dict[str, Any]:
        from service import jobs

        with _job_errors():
            return jobs.model_view(jobs.register_model(self.ctx, name, folder), with_config=True)

    def can_run(self, job: dict[str, Any]) -> bool:
        """Whether this process should run the job: nobody else does (no broker, no chunk
        leased right now) and it has work left."""
        if self.settings.broker_url or job["state"] not in ("queued", "running"):
            return False
        return not job["running_items"] and self.pending_items(job["id"]) > 0

    def pending_items(self, job_id: str) -> int:
        from sqlalchemy import func, select

        from service.db import Chunk, ChunkState

        with self.ctx.session() as session:
            total = session.scalar(
                select(func.coalesce(func.sum(Chunk.item_stop - Chunk.item_start), 0)).where(
                    Chunk.job_id == job_id, Chunk.state == ChunkState.PENDING
                )
            )
        return int(total or 0)

    def run(self, job_id: str, *, progress: Progress | None = None) -> dict[str, Any]:
        """Run the job's pending chunks in this process, then finalise it."""
        from service.runner import run_job
        from service.webhooks import deliver_due

        self.get(job_id)  # 404 for another tenant's or an unknown job
        with _job_errors():
            run_job(self.ctx, job_id, self.pipes, progress=progress or (lambda _f, _m: None))
        deliver_due(self.ctx)
        return self.get(job_id)

    def fetch(self, output: dict[str, str], target: Path) -> int:
        return _fetch_file_url(output["url"], target)

    def close(self) -> None:
        self._pipes = None


def _fetch_file_url(url: str, target: Path) -> int:
    parts = urlsplit(url)
    if parts.scheme != "file":
        raise ClientError(f"cannot copy {url}: not a local file")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        shutil.copyfile(unquote(parts.path), target)
    except OSError as exc:
        raise ClientError(f"cannot copy {url}: {exc.strerror or exc}") from None
    return target.stat().st_size


# ------------------------------------------------------------------------------------------------
# HTTP


def _detail(response: httpx.Response) -> str:
    """The server's error `detail` as one line (FastAPI validation lists become 'loc: msg')."""
    try:
        body = response.json()
    except ValueError:
        body = None
    detail = body.get("detail") if isinstance(body, dict) else None
    if isinstance(detail, list):
        from service.specs import KINDS

        parts = []
        for err in detail:
            if not isinstance(err, dict):
                parts.append(str(err))
                continue
            loc = [str(p) for p in err.get("loc", ()) if p not in ("body", *KINDS)]
            parts.append(f"{'.'.join(loc) or 'spec'}: {err.get('msg', 'invalid')}")
        detail = "; ".join(parts)
    if not detail:
        detail = (response.text or response.reason_phrase or "no detail").strip()
    return " ".join(str(detail).split()) + f" (HTTP {response.status_code})"


def _unwrap(data: Any, *names: str) -> Any:
    """A list body, or the list under one of `names` in an object body."""
    if isinstance(data, dict):
        for name in names:
            if isinstance(data.get(name), list):
                return data[name]
    return data


class HttpClient:
    """The HTTP API of DESIGN §5, with `Authorization: Bearer $DPIG_API_KEY`."""

    mode = "http"

    def __init__(self, base_url: str, api_key: str | None = None, *, timeout: float = 30.0) -> None:
        import httpx

        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the API at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise ClientError(_detail(response))
        if not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ClientError(
                f"the API at {self.base_url} answered {method} {path} with no JSON"
            ) from None

    def submit(
        self, spec: dict[str, Any], *, wait: bool = True, progress: Progress | None = None
    ) -> dict[str, Any]:
        del wait, progress  # the workers run it; the caller watches
        job: dict[str, Any] = self._call("POST", "/v1/jobs", json=spec)
        return job

    def get(self, job_id: str, *, full: bool = False) -> dict[str, Any]:
        params = {"view": "full"} if full else {}
        job: dict[str, Any] = self._call("GET", f"/v1/jobs/{job_id}", params=params)
        return job

    def list_jobs(self, *, state: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
        return self.list_page(state=state, limit=limit)[0]

    def list_page(
        self, *, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs, newest first, and the cursor of the next (None on the last)."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = state
        if cursor is not None:
            params["cursor"] = cursor
        body = self._call("GET", "/v1/jobs", params=params)
        jobs: list[dict[str, Any]] = _unwrap(body, "jobs", "data", "items")
        return jobs, body.get("next_cursor") if isinstance(body, dict) else None

    def events(self, job_id: str) -> Iterator[dict[str, Any]]:
        """The job's server-sent `progress` events (each a job view) until the stream ends."""
        import httpx

        try:
            with self.http.stream("GET", f"/v1/jobs/{job_id}/events") as response:
                if response.status_code >= 400:
                    response.read()
                    raise ClientError(_detail(response))
                event, data = "message", []
                for line in response.iter_lines():
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        body = json.loads("\n".join(data))
                        if event == "error":
                            raise ClientError(f"events: {body.get('detail', body)}")
                        if event == "progress":
                            yield body
                        event, data = "message", []
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the API at {self.base_url}: {exc}") from None

    def _control(self, verb: str, job_id: str) -> dict[str, Any]:
        job: dict[str, Any] = self._call("POST", f"/v1/jobs/{job_id}:{verb}")
        return job

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._control("cancel", job_id)

    def pause(self, job_id: str) -> dict[str, Any]:
        return self._control("pause", job_id)

    def resume(self, job_id: str) -> dict[str, Any]:
        return self._control("resume", job_id)

    def retry(self, job_id: str) -> dict[str, Any]:
        return self._control("retry", job_id)

    def outputs(self, job_id: str) -> list[dict[str, str]]:
        """Every output object, page by page."""
        out: list[dict[str, str]] = []
        params: dict[str, Any] = {}
        while True:
            body = self._call("GET", f"/v1/jobs/{job_id}/outputs", params=params)
            out += _unwrap(body, "outputs", "data", "items")
            cursor = body.get("next_cursor") if isinstance(body, dict) else None
            if not cursor:
                return out
            params = {"cursor": cursor}

    def models(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = _unwrap(
            self._call("GET", "/v1/models"), "models", "data", "items"
        )
        return out

    def model_info(self, name: str) -> dict[str, Any]:
        for model in self.models():
            if model.get("name") == name:
                return model
        raise ClientError(f"model: unknown model {name!r} (see `dpig models list`)")

    def register_model(self, name: str, folder: Path) -> dict[str, Any]:
        del name, folder
        raise ClientError(
            "models register: the API registers no models; run it where the workers' weights "
            "live, without DPIG_API_URL"
        )

    def can_run(self, job: dict[str, Any]) -> bool:
        del job
        return False  # the workers run jobs

    def pending_items(self, job_id: str) -> int:
        job = self.get(job_id)
        return int(job["total_items"] - job["done_items"] - job["failed_items"])

    def run(self, job_id: str, *, progress: Progress | None = None) -> dict[str, Any]:
        del progress
        return self.get(job_id)

    def fetch(self, output: dict[str, str], target: Path) -> int:
        import httpx

        url = output["url"]
        if url.startswith("file:"):
            return _fetch_file_url(url, target)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".part")
        try:
            with httpx.stream("GET", url, timeout=self.http.timeout) as response:
                if response.status_code >= 400:
                    raise ClientError(f"cannot download {output['key']}: {_detail(response)}")
                with open(tmp, "wb") as handle:
                    for block in response.iter_bytes(1 << 20):
                        handle.write(block)
            os.replace(tmp, target)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot download {output['key']}: {exc}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return target.stat().st_size

    def close(self) -> None:
        self.http.close()


def get_client() -> JobClient:
    """HTTP when `DPIG_API_URL` is set, else the embedded default."""
    from service.settings import get_settings

    settings = get_settings()
    if settings.api_url:
        return HttpClient(settings.api_url, os.environ.get("DPIG_API_KEY"))
    return EmbeddedClient()
