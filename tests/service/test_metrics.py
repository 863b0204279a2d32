"""Prometheus metrics (DESIGN §7): the catalogue in service/metrics.py, and the exposition of live
processes checked by `promtool check metrics` (Prometheus' own linter):

- a real `dpig dispatcher` (PostgreSQL + Redis) and its database gauges;
- a real `dpig worker` (Celery prefork, prometheus_client multiprocess mode) after it ran a chunk;
- the API's /metrics (TestClient).

The live tests need `promtool` (Debian: `apt-get install prometheus`), PostgreSQL at
`DPIG_TEST_POSTGRES_URL` (default `postgresql://postgres@127.0.0.1:5432/postgres`, trust auth) and
Redis at `DPIG_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`); each is skipped, with the
reason, when one is missing.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from service import metrics
from service.db import ChunkState, JobState, Queue
from service.jobs import Context, get_job, open_context, pause, resume, submit, tenant_id
from service.settings import Settings
from service.specs import parse_spec

ROOT = Path(__file__).resolve().parents[2]
REDIS_URL = os.environ.get("DPIG_TEST_REDIS_URL", "redis://127.0.0.1:6379")
PROMTOOL = shutil.which("promtool")
START_TIMEOUT_S = 60.0
JOB_TIMEOUT_S = 240.0

needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found (Debian: apt-get install prometheus); cannot lint the exposition",
)

# DESIGN §7, with each metric's type, labels and unit (None: a count, no unit).
CATALOGUE: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "dpig_images_generated_total": ("counter", (), None),
    "dpig_items_failed_total": ("counter", ("reason",), None),
    "dpig_batch_size": ("histogram", (), None),
    "dpig_batch_duration_seconds": ("histogram", (), "seconds"),
    "dpig_chunk_duration_seconds": ("histogram", (), "seconds"),
    "dpig_queue_wait_seconds": ("histogram", (), "seconds"),
    "dpig_stage_seconds_total": ("counter", ("stage",), "seconds"),
    "dpig_chunk_attempts_total": ("counter", ("outcome",), None),
    "dpig_work_items_outstanding": ("gauge", ("queue", "state"), None),
    "dpig_jobs": ("gauge", ("state",), None),
    "dpig_model_load_seconds": ("histogram", (), "seconds"),
}
# Added since DESIGN §7 was written (issue 18: expiry, retention, webhooks; docs/jobs.md).
ADDED: dict[str, tuple[str, tuple[str, ...], str | None]] = {
    "dpig_jobs_expired_total": ("counter", (), None),
    "dpig_jobs_deleted_total": ("counter", (), None),
    "dpig_webhook_attempts_total": ("counter", ("result",), None),
}
DESIGN_CATALOGUE = dict(CATALOGUE)
CATALOGUE |= ADDED
# Every value a label may take: the bounded sets a dashboard can rely on.
LABEL_VALUES: dict[str, set[str]] = {
    "reason": set(metrics.FAILURE_REASONS),
    "stage": set(metrics.STAGES),
    "outcome": set(metrics.OUTCOMES),
    "result": set(metrics.WEBHOOK_RESULTS),
    "queue": {q.value for q in Queue},
    "state": {s.value for s in ChunkState} | {s.value for s in JobState},
}
UUID_LIKE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)


# ------------------------------------------------------------------------------------------------
# helpers


def _catalogue_objects() -> dict[str, MetricWrapperBase]:
    """The metric objects of service/metrics.py by their exposed family name (+ `_total` for a
    counter, as the catalogue writes it)."""
    found = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name + ("_total" if value._type == "counter" else "")
            found[name] = value
    return found


def _promtool(exposition: bytes) -> None:
    """`promtool check metrics` exits 0 and reports no problem."""
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, timeout=60
    )
    problems = (result.stdout + result.stderr).decode(errors="replace").strip()
    assert result.returncode == 0 and not problems, f"promtool (rc {result.returncode}): {problems}"


def _samples(exposition: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) → value."""
    out = {}
    for family in text_string_to_metric_families(exposition.decode()):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _value(samples: dict[Any, float], name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _assert_bounded_labels(exposition: bytes) -> None:
    """Every dpig_ sample carries only its catalogue labels, with values from the bounded sets
    (and never anything that looks like a job id)."""
    seen = 0
    for family in text_string_to_metric_families(exposition.decode()):
        if not family.name.startswith("dpig_"):
            continue
        key = family.name + ("_total" if family.type == "counter" else "")
        base = family.name.removesuffix("_created")
        if key not in CATALOGUE and family.type == "gauge" and base != family.name:
            # the text format exposes a counter's or histogram's creation time as its own gauge
            key = next(k for k in (base + "_total", base) if k in CATALOGUE)
            _kind, labels, _unit = CATALOGUE[key]
        else:
            assert key in CATALOGUE, f"{key} is not in the DESIGN §7 catalogue"
            kind, labels, _unit = CATALOGUE[key]
            assert family.type == kind, f"{key}: exposed as {family.type}, expected {kind}"
        for sample in family.samples:
            seen += 1
            names = set(sample.labels) - {"le"}
            assert names == set(labels), f"{sample.name}: labels {sorted(names)}"
            for label in labels:
                value = sample.labels[label]
                assert value in LABEL_VALUES[label], f"{sample.name}{{{label}={value!r}}}"
                assert not UUID_LIKE.search(value)
    assert seen, "no dpig_ sample in the exposition"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _scrape(port: int, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        body: bytes = response.read()
        return body


def _wait_for(check: Callable[[], Any], what: str, timeout: float, procs: list[Any]) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for proc in procs:
            if proc.popen.poll() is not None:
                pytest.fail(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
        with contextlib.suppress(Exception):
            found = check()
            if found:
                return found
        time.sleep(0.3)
    tails = "\n".join(f"--- {p.name}:\n{p.tail()}" for p in procs)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tails}")


# ------------------------------------------------------------------------------------------------
# a live stack: PostgreSQL database, Redis database, output folder, dpig processes


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # the worker's prefork children are in its process group (its own session)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait()


@dataclass
class Stack:
    database_url: str
    broker_url: str
    root: Path

    @property
    def storage_url(self) -> str:
        return (self.root / "outputs").as_uri()

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("DPIG_") and k != "PROMETHEUS_MULTIPROC_DIR"
        }
        env.update(
            DPIG_HOME=str(self.root / "home"),
            DPIG_DATABASE_URL=self.database_url,
            DPIG_BROKER_URL=self.broker_url,
            DPIG_STORAGE_URL=self.storage_url,
            OMP_NUM_THREADS="1",
            PYTHONUNBUFFERED="1",
        )
        env.update(extra)
        return env

    def start(self, name: str, args: list[str], **env: str) -> Proc:
        log = self.root / f"{name}.log"
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                [sys.executable, "-m", "cli.main", *args],
                cwd=ROOT,
                env=self.env(**env),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return Proc(name, popen, log)

    def context(self) -> Context:
        settings = Settings.from_values(
            database_url=self.database_url,
            home=self.root / "home",
            storage_url=self.storage_url,
            batch_size=4,  # fixed on each job at submit: the worker runs micro-batches of 4
        )
        return open_context(settings, embedded=False, migrate=False)


@pytest.fixture(scope="module")
def stack_database(new_postgres_database: Callable[..., str]) -> str:
    """A migrated PostgreSQL database for this module."""
    return new_postgres_database("dpig_metrics_test")


@pytest.fixture(scope="module")
def broker_url() -> Iterator[str]:
    """An empty Redis database (of 1–15) on the test Redis server, flushed afterwards; other
    test runs on the same server pick another (theirs are not empty)."""
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except redis.RedisError as exc:
        pytest.skip(f"Redis not reachable at {REDIS_URL} ({exc}); skipping")
    for db in random.sample(range(1, 16), 15):
        candidate = redis.Redis.from_url(f"{REDIS_URL}/{db}")
        if candidate.dbsize() == 0:
            candidate.set("dpig-test-claim", "1")  # taken: no longer empty for anyone else
            try:
                yield f"{REDIS_URL}/{db}"
            finally:
                candidate.flushdb()
            return
    pytest.skip(f"no empty Redis database on {REDIS_URL}")


@pytest.fixture(scope="module")
def stack(stack_database: str, broker_url: str, tmp_path_factory: pytest.TempPathFactory) -> Stack:
    return Stack(stack_database, broker_url, tmp_path_factory.mktemp("metrics-stack"))


@pytest.fixture(scope="module")
def dispatcher(stack: Stack) -> Iterator[tuple[Proc, int]]:
    port = _free_port()
    proc = stack.start(
        "dispatcher", ["dispatcher", "--metrics-port", str(port), "--interval", "0.2"]
    )
    try:
        _wait_for(lambda: b"dpig_jobs{" in _scrape(port), "the dispatcher's first tick", 60, [proc])
        yield proc, port
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def worker(stack: Stack) -> Iterator[tuple[Proc, int]]:
    port = _free_port()
    proc = stack.start(
        "worker",
        ["worker", "--metrics-port", str(port), "--concurrency", "1", "--loglevel", "warning"],
        PROMETHEUS_MULTIPROC_DIR=str(stack.root / "worker-metrics"),
        DPIG_WORKER_STOP_FILE=str(stack.root / "worker.stop"),
        DPIG_TORCH_THREADS="1",
        DPIG_DEVICE="cpu",
        DPIG_BATCH_SIZE="4",
    )
    try:
        _wait_for(lambda: _scrape(port) is not None, "the worker's /metrics", 60, [proc])
        yield proc, port
    finally:
        proc.stop()


# ------------------------------------------------------------------------------------------------
# (a) the dispatcher


@needs_promtool
def test_dispatcher_exposition_passes_promtool(stack: Stack, dispatcher: tuple[Proc, int]) -> None:
    proc, port = dispatcher
    ctx = stack.context()
    # the operator lets this tenant use the interactive queue (by default tenants get bulk only)
    ctx.settings = ctx.settings.model_copy(update={"default_queues": ["bulk", "interactive"]})
    tenant = tenant_id(ctx, "metrics")
    spec = parse_spec(
        {"kind": "sample", "count": 10, "chunk_size": 4, "queue": "interactive", "seed": 1}
    )
    paused = submit(ctx, tenant, spec)
    pause(ctx, tenant, paused.id)  # nothing consumes: it must stay as submitted

    def jobs_in(state: str) -> Callable[[], bytes | None]:
        def scrape() -> bytes | None:
            body = _scrape(port)
            return body if _value(_samples(body), "dpig_jobs", state=state) == 1 else None

        return scrape

    body = _wait_for(jobs_in("paused"), "dpig_jobs{state=paused} = 1", 30, [proc])
    _promtool(body)
    _assert_bounded_labels(body)
    samples = _samples(body)
    for queue in Queue:
        for state in ("pending", "running"):
            assert _value(samples, "dpig_work_items_outstanding", queue=queue, state=state) == 0
    assert {state.value: _value(samples, "dpig_jobs", state=state.value) for state in JobState} == {
        state.value: (1 if state == JobState.PAUSED else 0) for state in JobState
    }
    # the catalogue's labelled counters exist from the start (touch_labels)
    assert _value(samples, "dpig_chunk_attempts_total", outcome="committed") == 0

    resume(ctx, tenant, paused.id)
    body = _wait_for(jobs_in("queued"), "dpig_jobs{state=queued} = 1", 30, [proc])
    pending = _value(_samples(body), "dpig_work_items_outstanding", queue="interactive",
                     state="pending")  # fmt: skip
    assert pending == 10
    _promtool(body)


# ------------------------------------------------------------------------------------------------
# (b) a worker that ran a chunk (multiprocess mode)


@needs_promtool
def test_worker_exposition_after_a_chunk_passes_promtool(
    stack: Stack, dispatcher: tuple[Proc, int], worker: tuple[Proc, int]
) -> None:
    worker_proc, port = worker
    ctx = stack.context()
    tenant = tenant_id(ctx, "metrics")
    spec = parse_spec({"kind": "sample", "count": 6, "chunk_size": 6, "seed": 2})
    job = submit(ctx, tenant, spec)

    def done() -> bool:
        return get_job(ctx, tenant, job.id).state == "completed"

    procs = [worker_proc, dispatcher[0]]
    _wait_for(done, f"job {job.id} to complete", JOB_TIMEOUT_S, procs)

    # counters are written by the child after the task; the parent's scrape reads its files
    def scraped() -> bytes | None:
        body = _scrape(port)
        committed = _value(_samples(body), "dpig_chunk_attempts_total", outcome="committed")
        return body if committed and committed >= 1 else None

    body = _wait_for(scraped, "committed attempts in the worker's exposition", 30, procs)
    _promtool(body)
    _assert_bounded_labels(body)
    samples = _samples(body)
    assert (_value(samples, "dpig_images_generated_total") or 0) >= 6
    assert (_value(samples, "dpig_chunk_attempts_total", outcome="committed") or 0) >= 1
    assert (_value(samples, "dpig_batch_size_count") or 0) >= 2  # 6 items, micro-batches of 4
    assert (_value(samples, "dpig_batch_size_sum") or 0) >= 6
    assert _value(samples, "dpig_batch_size_bucket", le="4.0") == _value(
        samples, "dpig_batch_size_count"
    )
    assert (_value(samples, "dpig_model_load_seconds_count") or 0) >= 1
    assert (_value(samples, "dpig_model_load_seconds_sum") or 0) > 0
    assert (_value(samples, "dpig_queue_wait_seconds_count") or 0) >= 1
    assert (_value(samples, "dpig_chunk_duration_seconds_count") or 0) >= 1
    for stage in ("load", "infer", "upload"):
        assert (_value(samples, "dpig_stage_seconds_total", stage=stage) or 0) > 0, stage
    # the parent's own metrics do not leak in from the default registry
    assert not any(name.startswith("process_") for name, _ in samples)


# ------------------------------------------------------------------------------------------------
# (c) the API


@needs_promtool
def test_api_exposition_passes_promtool(stack_database: str, tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from service.api import create_app

    settings = Settings.from_values(
        database_url=stack_database, home=tmp_path / "home", storage_url=tmp_path.as_uri()
    )
    metrics.touch_labels()
    with TestClient(create_app(settings)) as client:
        response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    _promtool(response.content)
    _assert_bounded_labels(response.content)


def test_api_metrics_route_is_the_catalogue_exposition() -> None:
    from service.api.routes import health

    assert health.exposition is metrics.exposition


# ------------------------------------------------------------------------------------------------
# (d) the catalogue


def _design_section_7() -> str | None:
    for folder in (ROOT.parent / "shared", ROOT / "shared", ROOT / "docs"):
        path = folder / "DESIGN.md"
        if path.is_file():
            text = path.read_text()
            found = re.search(r"^## 7\..*?(?=^## 8\.)", text, re.S | re.M)
            if found:
                return found.group(0)
    return None


def test_catalogue_matches_design_section_7() -> None:
    section = _design_section_7()
    if section is None:
        pytest.skip("DESIGN.md (§7) not found beside the repository")
    named = dict(re.findall(r"`(dpig_[a-z_]+)(?:\{([^}]*)\})?`", section))
    assert set(named) == set(DESIGN_CATALOGUE)
    for name, labels in named.items():
        parsed = tuple(part.split("=")[0] for part in labels.split(",")) if labels else ()
        assert parsed == CATALOGUE[name][1], name
        for part in labels.split(","):
            if "=" in part:  # label=value|value: the value set is the declared one
                label, values = part.split("=")
                assert set(values.split("|")) == LABEL_VALUES[label], name


def test_every_catalogue_metric_is_defined_with_its_type_and_labels() -> None:
    defined = _catalogue_objects()
    assert set(defined) == set(CATALOGUE)
    source = (ROOT / "service" / "metrics.py").read_text()
    for name, (kind, labels, _unit) in CATALOGUE.items():
        metric = defined[name]
        assert metric._type == kind, name
        assert tuple(metric._labelnames) == labels, name
        assert f'"{name}"' in source, f"{name} is not declared under its full name"
        assert metric._documentation.strip(), f"{name} has no help text"


def test_names_follow_prometheus_conventions() -> None:
    for name, (kind, _labels, unit) in CATALOGUE.items():
        assert re.fullmatch(r"dpig_[a-z][a-z0-9_]*[a-z0-9]", name), name
        assert "__" not in name
        assert name.endswith("_total") == (kind == "counter"), name
        base = name.removesuffix("_total")
        for suffix in ("_bucket", "_count", "_sum", "_created", "_info"):
            assert not base.endswith(suffix), name
        if unit is not None:
            assert base.endswith("_" + unit), f"{name}: unit {unit} must be the suffix"
        # base units only: seconds, not ms/us/minutes; bytes, not kb/mb
        assert not re.search(r"_(ms|us|ns|millis\w*|micro\w*|minutes?|hours?|[kmg]i?b)(_|$)", name)
    assert list(metrics.SECONDS_BUCKETS) == sorted(metrics.SECONDS_BUCKETS)
    assert max(metrics.SECONDS_BUCKETS) <= 3600 and min(metrics.SECONDS_BUCKETS) >= 0.001
    assert list(metrics.BATCH_BUCKETS) == sorted(metrics.BATCH_BUCKETS)


def test_label_values_are_bounded() -> None:
    # item errors carry job-specific text; the label is one of three words whatever the message
    messages = [
        "s3://bucket/photos/0001.png: no person found",
        "s3://bucket/photos/0002.png: unreadable image (cannot identify image file)",
        f"job {uuid.uuid4()}: CUDA out of memory",
        "",
        "x" * 10_000,
    ]
    assert {metrics.failure_reason(m) for m in messages} <= set(metrics.FAILURE_REASONS)
    assert metrics.failure_reason(messages[0]) == "no_person"
    assert metrics.failure_reason(messages[1]) == "bad_input"
    assert set(metrics.STAGES) == {"load", "decode", "infer", "encode", "upload"}
    # every literal label value in the code that increments the metrics is a declared one
    code = "".join(
        (ROOT / path).read_text()
        for path in ("service/executor.py", "workers/tasks.py", "service/dispatch.py")
    )
    stages = set(re.findall(r'_stage\("(\w+)"', code))
    outcomes = set(re.findall(r'(?:outcome|CHUNK_ATTEMPTS\.labels)\("(\w+)"\)', code))
    assert stages and stages <= set(metrics.STAGES), stages
    assert outcomes and outcomes <= set(metrics.OUTCOMES), outcomes
    # touch_labels makes every series of the bounded sets, and nothing else
    metrics.touch_labels()
    for name, (_kind, labels, _unit) in CATALOGUE.items():
        if labels and CATALOGUE[name][0] == "counter":
            children = _catalogue_objects()[name]._metrics  # type: ignore[attr-defined]
            (label,) = labels
            assert {key[0] for key in children} == LABEL_VALUES[label], name


def test_a_command_other_than_the_worker_runs_where_the_multiprocess_folder_is_missing(
    tmp_path: Path,
) -> None:
    # the worker image sets PROMETHEUS_MULTIPROC_DIR for every command; only `dpig worker` made
    # the folder, so an embedded `dpig submit` in that image died on its first metric
    folder = tmp_path / "dpig" / "metrics"
    code = "from service import metrics; metrics.IMAGES_GENERATED.inc(3)"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder), "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr[-2000:]
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(folder))  # type: ignore[no-untyped-call]
    assert "dpig_images_generated_total 3.0" in generate_latest(registry).decode()
