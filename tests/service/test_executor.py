"""The chunk executor and the embedded runner on SQLite + a local folder, with the bundled model."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from PIL import Image
from sqlalchemy import update

from service.db import Chunk, ChunkState, Job
from service.executor import PipelineCache
from service.jobs import Context, get_job, open_context, pause, resume, retry, submit, tenant_id
from service.runner import run_job
from service.settings import Settings
from service.specs import parse_spec
from tests.service.conftest import synthetic_people

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def pipes() -> PipelineCache:
    return PipelineCache(batch_size=8)


@pytest.fixture
def ctx(tmp_path: Path) -> Context:
    # jobs run with the micro-batch size fixed at submit: the same as the pipes fixture's
    settings = Settings.from_values(home=tmp_path / "home", max_attempts=2, batch_size=8)
    return open_context(settings, embedded=True)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return synthetic_people(tmp_path_factory.mktemp("people"), identities=3, seed=5)


def _grid_spec(folder: Path, keypoints: dict[str, Any], poses: int, chunk_size: int) -> Any:
    names = sorted(keypoints)
    targets = [
        {"id": f"pose{j}", "keypoints": keypoints[names[-1 - j]], "height": 64, "width": 32}
        for j in range(poses)
    ]
    return parse_spec(
        {
            "kind": "pose_grid",
            "images": str(folder),
            "poses": targets,
            "source_keypoints": keypoints,
            "chunk_size": chunk_size,
            "seed": 1,
        }
    )


def _out(ctx: Context, job_id: str) -> Path:
    return Path(ctx.storage.root_url.removeprefix("file://")) / "jobs" / job_id


def _shard_bytes(ctx: Context, job_id: str) -> dict[str, str]:
    """Shard file → sha256, by chunk (the attempt's tag left out of the name)."""
    shards = _out(ctx, job_id) / "shards"
    return {
        re.sub(r"-[0-9a-f]+\.", ".", p.name): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(shards.iterdir())
    }


def test_pose_grid_yields_every_source_in_every_pose(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]]
) -> None:
    import webdataset as wds

    folder, keypoints = people
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, _grid_spec(folder, keypoints, poses=3, chunk_size=4))
    sources = len(keypoints)
    assert job.total_items == sources * 3
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (sources * 3, 0)
    out = _out(ctx, job.id)
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["item"] for r in manifest] == list(range(sources * 3))
    assert {(r["source"], r["pose"]) for r in manifest} == {
        (s, f"pose{p}") for s in sorted(keypoints) for p in range(3)
    }
    assert len((out / "manifest.jsonl").read_text().splitlines()) == sources * 3
    samples = list(
        wds.WebDataset(sorted(str(p) for p in (out / "shards").glob("*.tar")), shardshuffle=False)
    )
    assert len(samples) == sources * 3 and len({s["__key__"] for s in samples}) == sources * 3
    first = Image.open(io.BytesIO(samples[0]["png"]))
    assert first.size == (32, 64)
    assert json.loads(samples[0]["json"])["pose"] == "pose0"
    assert (out / "_SUCCESS").is_file() and (out / "errors.jsonl").read_text() == ""
    (marker,) = (out / "shards").glob("000000-*.done.json")
    done = json.loads(marker.read_text())
    tar = marker.with_name(marker.name.replace(".done.json", ".tar")).read_bytes()
    assert done["tar_sha256"] == hashlib.sha256(tar).hexdigest() and done["items"] == 4


def test_rerunning_a_chunk_gives_byte_identical_output(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]]
) -> None:
    folder, keypoints = people
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, _grid_spec(folder, keypoints, poses=2, chunk_size=5))
    run_job(ctx, job.id, pipes)
    before = _shard_bytes(ctx, job.id)
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.job_id == job.id, Chunk.index == 1)
            .values(state=ChunkState.PENDING)
        )
        session.execute(update(Job).where(Job.id == job.id).values(state="queued"))
    for path in (_out(ctx, job.id) / "shards").glob("000001-*"):
        path.unlink()
    run_job(ctx, job.id, pipes)
    assert _shard_bytes(ctx, job.id) == before


def test_a_chunk_rerun_on_a_worker_configured_otherwise_gives_identical_bytes(
    tmp_path: Path,
) -> None:
    """The job fixes its micro-batch size at submit (batch 5 here); a worker whose own setting
    is 16 runs it with 5 too, so the rerun is byte-identical."""
    settings = Settings.from_values(home=tmp_path / "home", batch_size=5)
    ctx = open_context(settings, embedded=True)
    job = submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 16, "seed": 3}))
    assert json.loads(ctx.storage.get_bytes(f"jobs/{job.id}/job.json"))["execution"] == {
        "batch_size": 5,
        "precision": "fp32",
        "device": None,
    }
    run_job(ctx, job.id, PipelineCache(batch_size=5))
    before = pq.read_table(_out(ctx, job.id) / "manifest.parquet").column("sha256").to_pylist()
    with ctx.session() as session:
        session.execute(update(Chunk).where(Chunk.job_id == job.id).values(state="pending"))
        session.execute(update(Job).where(Job.id == job.id).values(state="queued"))
    run_job(ctx, job.id, PipelineCache(batch_size=16))
    after = pq.read_table(_out(ctx, job.id) / "manifest.parquet").column("sha256").to_pylist()
    assert len(before) == 16 and after == before


def test_a_job_fixed_to_another_device_class_is_refused(tmp_path: Path) -> None:
    settings = Settings.from_values(home=tmp_path / "home", device="cuda:0", max_attempts=1)
    ctx = open_context(settings, embedded=True)
    job = submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 2}))
    assert run_job(ctx, job.id, PipelineCache(device="cpu")) == "failed"
    with ctx.session() as session:
        chunk = session.query(Chunk).filter_by(job_id=job.id).one()
        assert "the job runs on cuda workers; this one runs on cpu" in (chunk.last_error or "")


def test_loading_sources_checks_for_stop_and_renews_the_lease(
    ctx: Context,
    pipes: PipelineCache,
    people: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pose-grid chunk reads its sources in groups (in parallel) and beats between groups: a
    stop asked for while loading stops the chunk before its first item, and a long load renews
    the lease."""
    from service import executor
    from service.jobs import claim_chunk

    folder, keypoints = people
    monkeypatch.setattr(executor, "LOAD_GROUP", 2, raising=False)
    reads: list[str] = []
    real_read = executor.read_uri

    def counted(ctx: Context, uri: str, **kw: Any) -> bytes:
        reads.append(uri)
        return real_read(ctx, uri, **kw)

    monkeypatch.setattr(executor, "read_uri", counted)
    monkeypatch.setattr(ctx.settings, "stop_check_seconds", 0)  # every beat asks
    job = submit(ctx, tenant_id(ctx), _grid_spec(folder, keypoints, poses=2, chunk_size=12))
    claim = claim_chunk(ctx, "w", job_id=job.id)
    assert claim is not None
    made: list[tuple[int, int]] = []
    outcome = executor.execute_chunk(
        ctx, claim, pipes, should_stop=lambda: bool(reads), progress=lambda *n: made.append(n)
    )
    assert (outcome.state, made, len(reads)) == ("stopped", [], 2)

    renewed: list[int] = []
    monkeypatch.setattr(executor, "renew_lease", lambda c, cl: renewed.append(1) or True)
    monkeypatch.setattr(ctx.settings, "lease_seconds", 0)  # every beat renews
    claim = claim_chunk(ctx, "w", job_id=job.id)
    assert claim is not None
    reads.clear()
    assert executor.execute_chunk(ctx, claim, pipes).state == "committed"
    assert len(reads) == 6 and len(renewed) >= 3  # one per group of 2 sources, at least


@pytest.mark.parametrize(("every", "asked"), [(0.0, 4 + 1), (3600.0, 1)])
def test_the_stop_check_runs_at_most_every_stop_check_seconds_and_before_the_commit(
    ctx: Context, pipes: PipelineCache, monkeypatch: pytest.MonkeyPatch, every: float, asked: int
) -> None:
    """The pause/cancel query runs between micro-batches only once `stop_check_seconds` have
    passed (at GPU rates, one per micro-batch would be many per second per worker), and always
    once more after the last image, so a stop before the commit is still seen."""
    from service.executor import execute_chunk
    from service.jobs import claim_chunk

    monkeypatch.setattr(ctx.settings, "stop_check_seconds", every)
    job = submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 32}))  # 4 batches
    claim = claim_chunk(ctx, "w", job_id=job.id)
    assert claim is not None
    checks: list[int] = []
    outcome = execute_chunk(ctx, claim, pipes, should_stop=lambda: bool(checks.append(1)))
    assert (outcome.state, outcome.done, len(checks)) == ("committed", 32, asked)

    claim = claim_chunk(
        ctx, "w", job_id=submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 32})).id
    )
    assert claim is not None
    stopped = execute_chunk(ctx, claim, pipes, should_stop=lambda: True)
    assert stopped.state == "stopped"  # the last check still stops a chunk before its commit


@pytest.mark.parametrize("error", ["storage", "soft_time_limit"])
def test_a_transient_read_error_fails_the_attempt_not_the_items(
    ctx: Context,
    pipes: PipelineCache,
    people: tuple[Path, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    error: str,
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    from service import executor
    from service.jobs import claim_chunk
    from service.storage import StorageError

    folder, keypoints = people
    raised = StorageError("S3 unavailable") if error == "storage" else SoftTimeLimitExceeded()

    def down(ctx: Context, uri: str, **kw: Any) -> bytes:
        raise raised

    monkeypatch.setattr(executor, "read_uri", down)
    job = submit(ctx, tenant_id(ctx), _grid_spec(folder, keypoints, poses=2, chunk_size=12))
    claim = claim_chunk(ctx, "w", job_id=job.id)
    assert claim is not None
    with pytest.raises(type(raised)):
        executor.execute_chunk(ctx, claim, pipes)
    with ctx.session() as session:
        assert session.query(Chunk).filter_by(job_id=job.id).one().state == "running"


def test_an_item_has_the_same_pixels_whatever_the_chunking(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]]
) -> None:
    folder, keypoints = people
    tenant = tenant_id(ctx)
    hashes = []
    for chunk_size in (3, 7):
        job = submit(ctx, tenant, _grid_spec(folder, keypoints, poses=2, chunk_size=chunk_size))
        run_job(ctx, job.id, pipes)
        rows = pq.read_table(_out(ctx, job.id) / "manifest.parquet").to_pylist()
        hashes.append([r["sha256"] for r in rows])
    assert hashes[0] == hashes[1]


def test_a_bad_item_fails_alone_and_retry_reruns_it(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, keypoints = people
    names = sorted(keypoints)
    good = {"uri": str(folder / names[0]), "keypoints": keypoints[names[0]]}
    later = tmp_path / "later.jpg"
    missing = {"uri": str(later), "keypoints": keypoints[names[1]]}
    spec = parse_spec(
        {
            "kind": "swap",
            "chunk_size": 2,
            "items": [
                {"fg": good, "bg": good, "pose": good},
                {"fg": missing, "bg": good, "pose": good},
                {"fg": good, "bg": good, "pose": good},
            ],
        }
    )
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, spec)
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (2, 1)
    errors = [
        json.loads(line) for line in (_out(ctx, job.id) / "errors.jsonl").read_text().splitlines()
    ]
    assert [e["item"] for e in errors] == [1] and "later.jpg" in errors[0]["error"]
    later.write_bytes((folder / names[1]).read_bytes())
    retry(ctx, tenant, job.id)
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (3, 0)
    assert (_out(ctx, job.id) / "errors.jsonl").read_text() == ""


def test_pause_stops_between_micro_batches_and_resume_finishes(
    ctx: Context, pipes: PipelineCache
) -> None:
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 40, "chunk_size": 16}))
    seen = []

    def progress(finished: int, made: int) -> None:
        seen.append(finished)
        if len(seen) == 20:  # inside the second chunk
            pause(ctx, tenant, job.id)

    assert run_job(ctx, job.id, pipes, progress=progress) == "paused"
    view = get_job(ctx, tenant, job.id)
    assert view.done_items == 16 and view.state == "paused"
    resume(ctx, tenant, job.id)
    assert run_job(ctx, job.id, pipes) == "completed"
    rows = pq.read_table(_out(ctx, job.id) / "manifest.parquet").to_pylist()
    assert [r["item"] for r in rows] == list(range(40))


def test_cancel_keeps_finished_shards_in_a_valid_manifest(
    ctx: Context, pipes: PipelineCache
) -> None:
    from service.jobs import cancel

    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 48, "chunk_size": 16}))
    seen = []

    def progress(finished: int, made: int) -> None:
        seen.append(finished)
        if len(seen) == 24:
            cancel(ctx, tenant, job.id)

    assert run_job(ctx, job.id, pipes, progress=progress) == "cancelled"
    out = _out(ctx, job.id)
    rows = pq.read_table(out / "manifest.parquet").to_pylist()
    assert [r["item"] for r in rows] == list(range(16))
    assert (out / "_CANCELLED").is_file() and not (out / "_SUCCESS").exists()
    assert [p.name[:7] for p in (out / "shards").glob("*.tar")] == ["000000-"]


def test_a_chunk_that_always_fails_is_dead_lettered(
    ctx: Context, pipes: PipelineCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    from service import shards

    real_write = shards.ShardWriter.write

    def poisoned(self: shards.ShardWriter, made_with: Any = None) -> dict[str, Any]:
        if self.index == 1:  # the operator's path must not reach the tenant's errors.jsonl
            raise OSError(errno.ENOSPC, "No space left on device", "/srv/dpig/secret/x.tar")
        return real_write(self, made_with)

    monkeypatch.setattr(shards.ShardWriter, "write", poisoned)
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 12, "chunk_size": 4}))
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (8, 4)
    with ctx.session() as session:
        chunk = session.query(Chunk).filter_by(job_id=job.id, index=1).one()
        assert chunk.state == ChunkState.DEAD and chunk.attempts == 2
        assert chunk.last_error == "I/O error: No space left on device"
    errors = (_out(ctx, job.id) / "errors.jsonl").read_text()
    assert '"chunk": 1' in errors and "No space left on device" in errors
    assert "/srv/dpig" not in errors and "Traceback" not in errors


def test_a_chunk_left_running_by_a_killed_process_is_run_again(
    ctx: Context, pipes: PipelineCache
) -> None:
    from datetime import timedelta

    from service.db import utcnow
    from service.jobs import claim_chunk

    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 8, "chunk_size": 4}))
    orphan = claim_chunk(ctx, "killed-process", job_id=job.id)
    assert orphan is not None
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.id == orphan.chunk_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1))
        )
    assert run_job(ctx, job.id, pipes) == "completed"
    assert get_job(ctx, tenant, job.id).done_items == 8


def test_too_many_chunks_are_refused_before_anything_is_written(ctx: Context) -> None:
    from service.jobs import JobError, list_jobs

    tenant = tenant_id(ctx)
    ctx.settings.max_chunks_per_job = 10
    with pytest.raises(JobError, match="chunk_size: 11 items in chunks of 1 make 11 chunks"):
        submit(ctx, tenant, parse_spec({"kind": "sample", "count": 11, "chunk_size": 1}))
    assert list_jobs(ctx, tenant) == ([], None) and ctx.storage.list("jobs/") == []


def test_oversized_huge_and_unlisted_format_sources_fail_their_items(
    pipes: PipelineCache, people: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    ctx = open_context(
        Settings.from_values(
            home=tmp_path / "home", max_source_bytes=100_000, max_source_pixels=1_000_000
        ),
        embedded=True,
    )
    folder, keypoints = people
    names = sorted(keypoints)
    good = {"uri": str(folder / names[0]), "keypoints": keypoints[names[0]]}
    huge = tmp_path / "huge.png"  # a few KB on disk, 25 megapixels decoded
    Image.new("L", (5000, 5000)).save(huge, optimize=True)
    gif = tmp_path / "person.gif"
    Image.open(folder / names[0]).convert("RGB").save(gif, format="GIF")
    big = tmp_path / "big.png"
    big.write_bytes((folder / names[0]).read_bytes() + b"\0" * 100_000)
    bad = [huge, gif, big]
    items = [{"fg": good, "bg": good, "pose": good}] + [
        {"fg": {"uri": str(p), "keypoints": keypoints[names[0]]}, "bg": good, "pose": good}
        for p in bad
    ]
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "swap", "chunk_size": 4, "items": items}))
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (1, 3)
    errors = {
        json.loads(line)["item"]: json.loads(line)["error"]
        for line in (_out(ctx, job.id) / "errors.jsonl").read_text().splitlines()
    }
    assert "5000x5000 image exceeds 1000000 pixels (max_source_pixels)" in errors[1]
    assert "image format GIF is not accepted" in errors[2]
    assert "larger than 100000 bytes (max_source_bytes)" in errors[3]


def test_local_sources_with_spaces_percent_hash_and_non_ascii_names(
    ctx: Context, pipes: PipelineCache, people: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    folder, keypoints = people
    names = sorted(keypoints)
    odd = tmp_path / "my photos #1 100% é"
    odd.mkdir()
    person = odd / "a b%20c.jpg"
    person.write_bytes((folder / names[0]).read_bytes())
    # the CLI sends local paths as file:// URIs (Path.as_uri percent-encodes them)
    ref = {"uri": person.as_uri(), "keypoints": keypoints[names[0]]}
    spec = parse_spec({"kind": "swap", "items": [{"fg": ref, "bg": ref, "pose": ref}]})
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, spec)
    assert run_job(ctx, job.id, pipes) == "completed"
    view = get_job(ctx, tenant, job.id)
    assert (view.done_items, view.failed_items) == (1, 0)
