"""The shard writer's own tar (byte for byte what `tarfile` writes) and the finaliser's manifest
lines (byte for byte `json.dumps(row, sort_keys=True)`)."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pytest

from service.finalize import Written, _write_rows
from service.shards import MANIFEST_SCHEMA, ShardWriter, tar_end, tar_member
from service.storage import LocalStorage


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


@pytest.mark.parametrize(
    "points",
    [
        [[12.34, 0.0, 1.0], [63.99, 2.5, 0.0], []],  # distinct coordinates formatted once
        [[12.34, -0.0, 1.0]],  # a negative zero, NaN, infinity: json.dumps row by row
        [[float("nan"), 2.5, 0.0]],
        [[float("inf"), 2.5, 0.0]],
        None,
    ],
)
def test_manifest_lines_are_json_dumps_with_sorted_keys(points: list[list[float]] | None) -> None:
    row = dict.fromkeys(MANIFEST_SCHEMA.names)
    rows = [
        row | {"key": "0000000000", "item": 0, "status": "ok", "seed": 3, "bytes": 10,
               "keypoints": points, "labels": '{"z": 1}',
               "object": "shards/000000.tar#0000000000.png"},
        row | {"key": "0000000001", "item": 1, "status": "error", "error": "bad \"é\"",
               "custom_id": "c1", "keypoints": None},
        row | {"key": "0000000002", "item": 2, "status": "expired", "keypoints": [[1.0, 2.0, 1.0]]},
    ]  # fmt: skip
    batch = pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA)
    manifest, errors, written = io.StringIO(), io.StringIO(), Written()
    _write_rows(batch.slice(1), manifest, errors, written)  # a slice: offsets into the lists
    _write_rows(batch.slice(0, 1), manifest, errors, written)
    rows = batch.slice(1).to_pylist() + batch.slice(0, 1).to_pylist()
    assert manifest.getvalue() == "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows)
    assert json.loads(errors.getvalue()) == {
        "key": "0000000001", "item": 1, "custom_id": "c1", "error": "bad \"é\""
    }  # fmt: skip
    assert (written.items, written.done, written.expired, written.failed) == (3, 1, 1, 1)
