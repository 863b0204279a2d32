"""The encode pool: CPU quota, item order, and the executor's overlapped path (byte-identical
to the serial one for every kind and format; a stuck encoder neither lets the lease lapse nor
hides a cancel)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from pydantic import ValidationError

from service import encode_pool
from service.db import Chunk
from service.encode_pool import OrderedEncoder, cgroup_cpu_quota, default_workers
from service.encoding import encode_and_hash
from service.executor import PipelineCache, execute_chunk
from service.jobs import Context, cancel, claim_chunk, open_context, submit, tenant_id
from service.runner import run_job
from service.settings import Settings
from service.specs import OutputFormat, parse_spec
from tests.service.conftest import synthetic_people

FORMATS = {
    "png": {},
    "png-level1": {"format": "png", "compress_level": 1},
    "webp-lossless": {"format": "webp", "lossless": True},
    "webp-q80": {"format": "webp", "quality": 80},
    "jpeg-q85": {"format": "jpeg", "quality": 85},
}


@pytest.fixture(scope="module")
def pipes() -> Any:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield PipelineCache(batch_size=4)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def people(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    return synthetic_people(tmp_path_factory.mktemp("people"), identities=2, seed=3)


def _context(home: Path, **values: Any) -> Context:
    return open_context(Settings.from_values(home=home, **values), embedded=True)


def _out(ctx: Context, job_id: str) -> Path:
    return Path(ctx.storage.root_url.removeprefix("file://")) / "jobs" / job_id


def _spec(kind: str, people: tuple[Path, dict[str, Any]], output: dict[str, Any]) -> Any:
    folder, keypoints = people
    names = sorted(keypoints)
    refs = [{"uri": str(folder / n), "keypoints": keypoints[n]} for n in names]
    common = {"chunk_size": 6, "seed": 4, "output": output}
    if kind == "sample":
        body = {"kind": "sample", "identities": 3, "per_identity": 3}
    elif kind == "pose_grid":
        poses = [{"id": f"p{j}", "keypoints": keypoints[n], "height": 64, "width": 32}
                 for j, n in enumerate(names[:3])]  # fmt: skip
        body = {"kind": "pose_grid", "images": str(folder), "poses": poses,
                "source_keypoints": keypoints}  # fmt: skip
    elif kind == "swap":
        body = {"kind": "swap", "items": [
            {"fg": refs[i % 4], "bg": refs[(i + 1) % 4], "pose": refs[(i + 2) % 4]}
            for i in range(7)
        ]}  # fmt: skip
    else:
        body = {"kind": "interpolate", "pairs": [{"a": refs[0], "b": refs[1]}], "steps": 7}
    return parse_spec(common | body)


def _outputs(ctx: Context, job_id: str) -> dict[str, bytes]:
    out = _out(ctx, job_id) / "shards"
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".json")}


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("kind", ["sample", "pose_grid", "swap", "interpolate"])
def test_the_overlapped_executor_writes_the_serial_paths_bytes(
    kind: str, fmt: str, people: tuple[Path, dict[str, Any]], pipes: Any, tmp_path: Path
) -> None:
    shards = []
    for workers in (0, 2):  # 0: encoded one by one in the model's thread
        ctx = _context(tmp_path / f"w{workers}", encode_workers=workers)
        job = submit(ctx, tenant_id(ctx), _spec(kind, people, FORMATS[fmt]))
        assert run_job(ctx, job.id, pipes) == "completed"
        shards.append(_outputs(ctx, job.id))
    assert len(shards[0]) >= 4 and shards[0] == shards[1]
    extension = OutputFormat(**FORMATS[fmt]).extension
    with tarfile.open(fileobj=io.BytesIO(shards[1]["000000-1.tar"])) as tar:
        names = tar.getnames()
        assert names[0].endswith(f".{extension}") and names[1].endswith(".json")
        data = tar.extractfile(names[0]).read()  # type: ignore[union-attr]
    expected = {"png": "PNG", "webp": "WEBP", "jpg": "JPEG"}[extension]
    assert Image.open(io.BytesIO(data)).format == expected


def test_png_bytes_are_those_of_the_serial_encoder_before_the_pool(
    pipes: Any, tmp_path: Path
) -> None:
    from dpig_core.imaging import to_uint8

    ctx = _context(tmp_path, encode_workers=2)
    job = submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 6, "seed": 2}))
    assert run_job(ctx, job.id, pipes) == "completed"
    rows = pq.read_table(_out(ctx, job.id) / "manifest.parquet").to_pylist()
    pipe = next(iter(pipes._pipes.values()))
    expected = []
    for image in pipe.sample(list(range(6)), 2):  # what the executor did before this change
        buf = io.BytesIO()
        Image.fromarray(to_uint8(image)).save(buf, format="PNG")
        expected.append(hashlib.sha256(buf.getvalue()).hexdigest())
    assert [r["sha256"] for r in rows] == expected
    assert all(r["object"].endswith(".png") for r in rows)


@pytest.mark.parametrize("fmt", ["png", "webp-lossless", "webp-q80", "jpeg-q85"])
def test_webdataset_decodes_every_format(fmt: str, pipes: Any, tmp_path: Path) -> None:
    import webdataset as wds

    ctx = _context(tmp_path)
    spec = parse_spec({"kind": "sample", "count": 5, "output": FORMATS[fmt]})
    job = submit(ctx, tenant_id(ctx), spec)
    assert run_job(ctx, job.id, pipes) == "completed"
    tars = sorted(str(p) for p in (_out(ctx, job.id) / "shards").glob("*.tar"))
    samples = list(wds.WebDataset(tars, shardshuffle=False).decode("rgb8"))
    extension = OutputFormat(**FORMATS[fmt]).extension
    assert len(samples) == 5
    assert all(s[extension].shape == (64, 32, 3) and s[extension].dtype == np.uint8
               for s in samples)  # fmt: skip
    job_json = (_out(ctx, job.id) / "job.json").read_text()
    assert f'"format": "{OutputFormat(**FORMATS[fmt]).format}"' in job_json
    if fmt == "webp-lossless":  # lossless: the pixels the model made
        rows = pq.read_table(_out(ctx, job.id) / "manifest.parquet").to_pylist()
        assert rows[0]["object"].endswith(".webp")


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ({"format": "gif"}, "Input should be 'png', 'webp' or 'jpeg'"),
        ({"format": "png", "compress_level": 10}, "less than or equal to 9"),
        ({"format": "jpeg", "quality": 0}, "greater than or equal to 1"),
        ({"format": "webp", "quality": 101}, "less than or equal to 100"),
        ({"format": "jpeg", "compress_level": 3}, "compress_level applies to png only"),
        ({"format": "png", "quality": 80}, "png takes compress_level"),
        ({"format": "jpeg", "lossless": True}, "lossless applies to webp only"),
        ({"format": "webp", "lossless": True, "quality": 80}, "lossless webp takes none"),
        ({"format": "png", "level": 3}, "Extra inputs are not permitted"),
    ],
)
def test_bad_output_options_are_refused_at_submit(output: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        parse_spec({"kind": "sample", "count": 1, "output": output})


# ------------------------------------------------------------------------------------------------
# a stuck encoder


class _StuckEncoder:
    """Encodes the first image, then blocks every call until `release` is set."""

    def __init__(self) -> None:
        self.release, self.first_done = threading.Event(), threading.Event()
        self.calls = 0

    def __call__(self, pixels: Any, fmt: OutputFormat) -> tuple[bytes, str]:
        self.calls += 1
        if self.calls > 1:
            self.release.wait(60)
        result = encode_and_hash(pixels, fmt)
        self.first_done.set()
        return result


def _run_in_thread(target: Any) -> tuple[threading.Thread, list[Any]]:
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(target()), daemon=True)
    thread.start()
    return thread, result


def _expiry(ctx: Context, chunk_id: int) -> Any:
    with ctx.session() as session:
        chunk = session.get(Chunk, chunk_id)
        assert chunk is not None
        return chunk.lease_expires_at


def test_a_stuck_encoder_does_not_let_the_lease_lapse(
    pipes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = _StuckEncoder()
    monkeypatch.setattr(encode_pool, "encode_and_hash", stuck)
    ctx = _context(tmp_path, lease_seconds=3, encode_workers=1)
    job = submit(ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": 8}))
    claim = claim_chunk(ctx, "w1", job_id=job.id)
    assert claim is not None
    first = _expiry(ctx, claim.chunk_id)
    thread, result = _run_in_thread(lambda: execute_chunk(ctx, claim, pipes))
    try:
        assert stuck.first_done.wait(60)
        seen, deadline = [first], time.monotonic() + 20
        while len(set(seen)) < 3:  # two renewals while the encoder is stuck
            assert thread.is_alive() and time.monotonic() < deadline, "the lease was not renewed"
            time.sleep(0.1)
            seen.append(_expiry(ctx, claim.chunk_id))
        assert stuck.calls == 2  # still stuck on the second image
    finally:
        stuck.release.set()
    thread.join(60)
    assert result[0].state == "committed" and result[0].done == 8


def test_a_stuck_encoder_does_not_hide_a_cancel(
    pipes: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = _StuckEncoder()
    monkeypatch.setattr(encode_pool, "encode_and_hash", stuck)
    ctx = _context(tmp_path, encode_workers=1)
    tenant = tenant_id(ctx)
    job = submit(ctx, tenant, parse_spec({"kind": "sample", "count": 4}))  # one micro-batch
    claim = claim_chunk(ctx, "w1", job_id=job.id)
    assert claim is not None
    checked = threading.Event()

    def should_stop() -> bool:
        from service.jobs import job_state

        stop = job_state(ctx, job.id) in ("cancelling", "cancelled")
        checked.set()
        return stop

    thread, result = _run_in_thread(
        lambda: execute_chunk(ctx, claim, pipes, should_stop=should_stop)
    )
    try:
        assert stuck.first_done.wait(60) and checked.wait(60)
        cancel(ctx, tenant, job.id)  # after the check that follows the only micro-batch
        thread.join(30)  # the encoder is still stuck: only the checks while waiting end this
        assert not thread.is_alive() and result[0].state == "stopped"
        assert stuck.calls == 2
    finally:
        stuck.release.set()


# ------------------------------------------------------------------------------------------------
# the pool's parts


def test_items_come_back_in_order_with_errors_in_place() -> None:
    fmt = OutputFormat()
    images = np.random.default_rng(0).integers(0, 256, (6, 8, 4, 3), dtype=np.uint8)
    with ThreadPoolExecutor(3) as pool:
        encoder = OrderedEncoder(pool, fmt, max_pending=2)
        got = []
        for i, image in enumerate(images):
            if i == 3:
                encoder.put_error(i, "no person found", {"item": i})
            else:
                encoder.put(i, image, {"item": i}, None)
            got += encoder.ready(drain=False, checkpoint=lambda: False, poll_seconds=0.01)
            assert len(got) >= i + 1 - 3  # at most max_pending images wait
        got += encoder.ready(drain=True, checkpoint=lambda: False, poll_seconds=0.01)
    assert [e.item for e in got] == list(range(6))
    assert got[3].error == "no person found" and got[3].data == b""
    assert got[0].data == encode_and_hash(images[0], fmt)[0]
    assert got[0].sha256 == hashlib.sha256(got[0].data).hexdigest()


class _CountingPool(ThreadPoolExecutor):
    tasks = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        self.tasks += 1
        return super().submit(fn, *args, **kwargs)


def test_images_go_to_the_pool_in_groups_and_come_back_in_order() -> None:
    fmt = OutputFormat()
    images = np.random.default_rng(1).integers(0, 256, (9, 8, 4, 3), dtype=np.uint8)
    with _CountingPool(2) as pool:
        encoder = OrderedEncoder(pool, fmt, max_pending=8, group=3)
        got = []
        for i, image in enumerate(images):
            if i == 4:  # closes the open group [3]: the error keeps its place after it
                encoder.put_error(i, "no person found", {"item": i})
            else:
                encoder.put(i, image, {"item": i}, None)
            if i == 5:  # a micro-batch ends: the open group [5] goes to the pool
                got += encoder.ready(drain=False, checkpoint=lambda: False, poll_seconds=0.01)
        got += encoder.ready(drain=True, checkpoint=lambda: False, poll_seconds=0.01)
    assert pool.tasks == 4  # [0 1 2] [3] [5] [6 7 8]; the error is no task
    assert [e.item for e in got] == list(range(9))
    assert got[4].error == "no person found"
    for e in got[:4] + got[5:]:
        assert (e.data, e.sha256) == encode_and_hash(images[e.item], fmt)


def test_the_pool_size_follows_the_cgroup_cpu_quota(tmp_path: Path) -> None:
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2) == 1.5
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(v1) == 1.0
    assert default_workers(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(v1) is None
    assert cgroup_cpu_quota(tmp_path / "none") is None
    assert default_workers(tmp_path / "none") == len(__import__("os").sched_getaffinity(0))
