"""The shard writer's own tar: byte for byte what `tarfile` writes, whichever threads made the
entries."""

from __future__ import annotations

import io
import json
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from service.shards import ShardWriter, tar_end, tar_member
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
