"""The public Python client (`dpig.client.Client`) driving jobs end to end against the real API:
uvicorn serving `create_app` on 127.0.0.1 (PostgreSQL, a local output folder), and the chunk
executor (`service.runner.run_job`, what a worker runs) making the images."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from dpig.client import Client, ClientError, JobView
from service.api import create_app
from service.db import ApiKey
from service.db.keys import new_api_key
from service.dispatch import finalize_ready
from service.executor import PipelineCache
from service.jobs import Context, tenant_id
from service.runner import run_job
from service.settings import Settings

Spec = Callable[..., dict[str, Any]]


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache(batch_size=4)


class Server:
    """The API on an ephemeral port, in a thread."""

    def __init__(self, settings: Settings) -> None:
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=0, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.05)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.ctx: Context = config.app.state.context  # type: ignore[union-attr]

    def key(self, tenant: str) -> str:
        clear, prefix, key_hash = new_api_key()
        with self.ctx.session() as session:
            session.add(ApiKey(tenant_id=tenant_id(self.ctx, tenant), prefix=prefix,
                               key_hash=key_hash))  # fmt: skip
        return clear

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture
def api(settings: Settings) -> Iterator[Server]:
    server = Server(settings)
    yield server
    server.stop()


def test_client_drives_a_job_end_to_end(
    api: Server, pipes: PipelineCache, sample_spec: Spec, tmp_path: Path
) -> None:
    with Client(api.url, api_key=api.key("alice")) as dpig:
        job = dpig.submit(sample_spec(count=6, chunk_size=2))
        assert isinstance(job, JobView) and (job.state, job.total_items) == ("queued", 6)
        assert dpig.pause(job.id).state == "paused"
        assert dpig.resume(job.id).state == "queued"

        # progress events while a worker runs it
        worker = threading.Thread(target=run_job, args=(api.ctx, job.id, pipes))
        seen: list[JobView] = []
        for event in dpig.iter_events(job.id):
            seen.append(event)
            if len(seen) == 1:
                worker.start()
        worker.join()
        assert seen[-1].state == "completed" and seen[-1].done_items == 6
        done = [e.done_items for e in seen]
        assert done == sorted(done) and len(seen) >= 2

        finished = dpig.wait(job.id, timeout=30)
        assert (finished.state, finished.done_items, finished.failed_items) == ("completed", 6, 0)
        assert dpig.get(job.id, full=True).spec is not None

        outputs = dpig.outputs(job.id)
        keys = [o.key for o in outputs]
        assert "manifest.parquet" in keys and "shards/000002-1.tar" in keys
        copied = dpig.download(job.id, tmp_path / "copy")
        files = sorted(p for p in (tmp_path / "copy").rglob("*") if p.is_file())
        assert len(files) == len(outputs) and copied == sum(p.stat().st_size for p in files)

        with pytest.raises(ClientError, match="no failed items"):
            dpig.retry(job.id)

        # pagination: three jobs, pages of two, newest first
        second = dpig.submit(sample_spec(count=2))
        third = dpig.submit(sample_spec(count=2))
        page = dpig.list(limit=2)
        assert [j.id for j in page.jobs] == [third.id, second.id] and page.next_cursor
        rest = dpig.list(limit=2, cursor=page.next_cursor)
        assert [j.id for j in rest.jobs] == [job.id] and rest.next_cursor is None
        assert [j.id for j in dpig.iter_jobs(page_size=1)] == [third.id, second.id, job.id]
        assert [j.id for j in dpig.iter_jobs(state="completed")] == [job.id]

        assert dpig.cancel(second.id).state == "cancelling"  # the request only marks it
        assert finalize_ready(api.ctx) == 1  # what the dispatcher's finaliser does
        assert dpig.wait(second.id, timeout=30).state == "cancelled"
        with pytest.raises(TimeoutError, match="still queued"):
            dpig.wait(third.id, timeout=0.2, interval=0.1)
        with pytest.raises(ClientError, match=r"count: .*greater than or equal to 1 \(HTTP 422\)"):
            dpig.submit(sample_spec(count=0))

    with Client(api.url, api_key=api.key("bob")) as other:
        with pytest.raises(ClientError, match="HTTP 404"):
            other.get(job.id)
        assert list(other.iter_jobs()) == []
