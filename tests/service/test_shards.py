"""The shard writer's own tar: byte for byte what `tarfile` writes, whichever threads made the
entries and whichever storage it streams to; a chunk closed unfinished leaves nothing behind."""

from __future__ import annotations

import hashlib
import io
import json
import random
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from service.shards import ShardWriter, tar_end, tar_member
from service.storage import LocalStorage, S3Storage, Storage
from service.uploads import MIN_PART_BYTES
from tests.service.conftest import multipart_uploads, parts_storage


def _tarfile_bytes(members: list[tuple[str, bytes]]) -> bytes:
    """What the shard writer wrote with `tarfile` before it built its own headers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            archive.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize(
    "sizes", [[], [0], [1, 511, 512, 513], [10_000, 20_480, 16_433], list(range(0, 5000, 97))]
)
def test_tar_members_are_the_bytes_tarfile_writes(sizes: list[int]) -> None:
    members = [
        (f"{i:010d}.{'json' if i % 2 else 'png'}", bytes((i + j) % 251 for j in range(size)))
        for i, size in enumerate(sizes)
    ]
    members.append(("x" * 100, b"the longest name a header holds"))
    ours = b"".join(tar_member(name, data) for name, data in members)
    assert ours + tar_end(len(ours)) == _tarfile_bytes(members)


def test_a_name_over_100_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="longer than 100"):
        tar_member("x" * 101, b"")


def test_entries_made_in_threads_give_the_shard_of_adds_in_order(tmp_path: Path) -> None:
    storage = LocalStorage(tmp_path / "out")
    images = [bytes([i]) * (300 + 97 * i) for i in range(40)]
    metas = [{"item": i, "seed": 1, "keypoints": [[1.5, 2.25, 1.0]], "labels": {"i": i}}
             for i in range(40)]  # fmt: skip
    serial = ShardWriter(storage, "a/", 0, tag="1")
    for i, (image, meta) in enumerate(zip(images, metas, strict=True)):
        if i == 7:
            serial.fail(i, "no person found", meta)
        else:
            serial.add(i, image, meta)
    threaded = ShardWriter(storage, "b/", 0, tag="1")
    with ThreadPoolExecutor(4) as pool:
        entries = [pool.submit(threaded.entry, i, image, meta)
                   for i, (image, meta) in enumerate(zip(images, metas, strict=True))]  # fmt: skip
        for i, entry in enumerate(entries):
            if i == 7:
                threaded.fail(i, "no person found", metas[i])
            else:
                threaded.add_entry(entry.result())
            if i % 5 == 0:
                threaded.flush()
    assert serial.write() == threaded.write()
    tars = [(tmp_path / "out" / p / "shards" / "000000-1.tar").read_bytes() for p in "ab"]
    assert tars[0] == tars[1]
    expected = []
    for i, (image, meta) in enumerate(zip(images, metas, strict=True)):
        if i != 7:
            labels = json.dumps(meta, sort_keys=True).encode()
            expected += [(f"{i:010d}.png", image), (f"{i:010d}.json", labels)]
    assert tars[0] == _tarfile_bytes(expected)


def _big_items(count: int) -> list[tuple[bytes, dict[str, Any]]]:
    """Images large enough that a few of them fill S3 parts of the minimum size."""
    rng = random.Random(7)
    return [(rng.randbytes(2_000_000 + 1000 * i), {"item": i, "seed": i}) for i in range(count)]


def test_a_shard_streamed_to_s3_in_parts_is_the_local_shard(
    s3_server: Any, s3_bucket: str, tmp_path: Path
) -> None:
    local = LocalStorage(tmp_path / "out")
    s3 = parts_storage(s3_server.client(), s3_bucket, "out")
    markers = []
    for storage in (local, s3):
        writer = ShardWriter(storage, "job/", 3, tag="9")
        for i, (image, meta) in enumerate(_big_items(8)):
            writer.add(i, image, meta)
            writer.flush()
        markers.append(writer.write())
    assert markers[0] == markers[1]
    tar = local.get_bytes("job/shards/000003-9.tar")
    assert len(tar) > 3 * MIN_PART_BYTES  # four parts on S3
    assert s3.get_bytes("job/shards/000003-9.tar") == tar
    assert hashlib.sha256(tar).hexdigest() == markers[0]["tar_sha256"]
    for name in ("parquet", "done.json"):
        key = f"job/shards/000003-9.{name}"
        assert s3.get_bytes(key) == local.get_bytes(key)
    assert multipart_uploads(s3) == []


@pytest.mark.parametrize("backend", ["local", "s3"])
def test_a_chunk_closed_without_write_leaves_no_shard(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    storage: Storage
    if backend == "local":
        storage = LocalStorage(tmp_path / "out")
    else:
        server = request.getfixturevalue("s3_server")
        storage = parts_storage(server.client(), request.getfixturevalue("s3_bucket"), "out")
    writer = ShardWriter(storage, "job/", 0, tag="1")
    for i, (image, meta) in enumerate(_big_items(6)):  # more than two parts on S3
        writer.add(i, image, meta)
        writer.flush()
    writer.close()  # what the executor does with a stopped, cancelled or failed chunk
    writer.close()
    assert storage.list() == []
    if isinstance(storage, S3Storage):
        assert multipart_uploads(storage) == []
    else:  # not even a temporary file (listings skip those)
        assert [p for p in (tmp_path / "out").rglob("*") if p.is_file()] == []
