"""Job outputs (DESIGN §4): one shard per chunk, then a manifest written by the finaliser.

A shard is `shards/NNNNNN-<tag>.tar` (WebDataset: `<key>.<png|webp|jpg>` + `<key>.json` per
item), `shards/NNNNNN-<tag>.parquet` (one row per item, failed ones included), the same rows as
the lines of `manifest.jsonl` (`shards/NNNNNN-<tag>.jsonl`, made beside the encoder so that the
finaliser only copies them) and `shards/NNNNNN-<tag>.done.json` (the commit marker: counts and
the SHA-256 of the others).
`<tag>` names the attempt that wrote it; the chunk's commit records which attempt is canonical,
so objects of a committed attempt are never written again (a stale attempt writes its own keys).
With `layout=files` each image is its own object under `images/` instead of the tar (untagged:
those names are the user's; a stale attempt there rewrites the same item's image). Everything
is byte-for-byte reproducible: tar headers carry fixed times and owners, PNGs no timestamps, and
the rows come in item order.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from service.storage import Storage
from service.uploads import Upload

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("item", pa.int64()),
        ("custom_id", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("source", pa.string()),
        ("pose", pa.string()),
        ("identity", pa.int64()),
        ("seed", pa.int64()),
        ("keypoints", pa.list_(pa.list_(pa.float32()))),  # service.labels: [18][row, col, visible]
        ("labels", pa.string()),  # JSON; DuckDB: labels->>'$.z_seeds.pose'
        ("object", pa.string()),
        ("sha256", pa.string()),
        ("bytes", pa.int64()),
    ]
)


def shard_name(index: int, tag: str = "") -> str:
    """`shards/NNNNNN-<tag>`; an empty tag is the untagged name of shards from before tags."""
    return f"shards/{index:06d}-{tag}" if tag else f"shards/{index:06d}"


SHARD_KEY = re.compile(
    r"shards/(?P<index>\d{6})(?:-(?P<tag>[0-9a-f]+))?\.(?:tar|parquet|jsonl|done\.json)"
)


def parse_shard_key(key: str) -> tuple[int, str] | None:
    """(chunk index, attempt tag) of a shard object key relative to the job's folder."""
    found = SHARD_KEY.fullmatch(key)
    return (int(found["index"]), found["tag"] or "") if found else None


# A shard's tar is written here, not with `tarfile`, whose header building cost more than the rest
# of an item's bookkeeping. The bytes are those `tarfile` writes in USTAR format for a regular
# file with mode 0644, owner 0:0 and no owner names, mtime 0 (tests/service/test_shards.py).
TAR_BLOCK = 512
TAR_RECORD = 20 * TAR_BLOCK  # tarfile pads the archive to whole records
_MODE_OWNER = b"0000644\0" + b"0000000\0" * 2  # mode, uid, gid
_MTIME = b"00000000000\0"
_AFTER_CHECKSUM = (
    b" 0"  # the checksum field's last byte (tarfile leaves its space), then type: a file
    + b"\0" * 100  # linkname
    + b"ustar\x0000"  # magic, version
    + b"\0" * (32 + 32 + 16)  # uname, gname, devmajor/devminor (empty for a file)
    + b"\0" * (155 + 12)  # prefix, padding to 512
)
# the checksum is the sum of the header's bytes with its own 8-byte field read as spaces
_FIXED_SUM = sum(_MODE_OWNER) + sum(_MTIME) + 7 * ord(" ") + sum(_AFTER_CHECKSUM)


def tar_member(name: str, data: bytes) -> bytes:
    """One tar member: the USTAR header of `name` (ASCII, at most 100 bytes), `data`, and zeros
    to the next 512-byte block."""
    encoded = name.encode("ascii")
    if len(encoded) > 100:
        raise ValueError(f"tar member name longer than 100 bytes: {name!r}")
    size = b"%011o\0" % len(data)
    checksum = b"%06o\0" % (_FIXED_SUM + sum(encoded) + sum(size))
    header = (encoded.ljust(100, b"\0"), _MODE_OWNER, size, _MTIME, checksum, _AFTER_CHECKSUM)
    return b"".join((*header, data, b"\0" * (-len(data) % TAR_BLOCK)))


def tar_end(size: int) -> bytes:
    """What closes an archive of `size` bytes: two zero blocks, then zeros to a whole record."""
    size += 2 * TAR_BLOCK
    return b"\0" * (2 * TAR_BLOCK + -size % TAR_RECORD)


def sha256_of(handle: Any, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while piece := handle.read(block):
        digest.update(piece)
    return digest.hexdigest()


def manifest_line(row: dict[str, Any]) -> bytes:
    """A manifest row as its `manifest.jsonl` line: the JSON the finaliser would make of the row
    read back from the shard's parquet (keypoints as float32, keys sorted)."""
    if row["keypoints"] is not None:
        row = row | {"keypoints": np.asarray(row["keypoints"], np.float32).tolist()}
    return json.dumps(row, sort_keys=True).encode() + b"\n"


def item_key(item: int) -> str:
    """WebDataset keys may not contain dots; zero-padded so that keys sort in item order."""
    return f"{item:010d}"


@dataclass(frozen=True)
class ShardEntry:
    """One made item, ready to go into a shard in item order (`ShardWriter.entry`)."""

    row: dict[str, Any]
    line: bytes  # the row's manifest.jsonl line
    tar: bytes = b""  # its image and JSON members (layout=webdataset)
    file: tuple[str, bytes] | None = None  # (object, image) for layout=files


@dataclass
class ShardWriter:
    """Collects one chunk's items, then writes its objects under `prefix` (the job's folder), with
    `tag` (the attempt) in their keys. The tar is uploaded as it grows (`Storage.open_upload`:
    parts go up in the background on S3), and is published by `write`; `close` without `write`
    drops it.

    `entry` does an item's work (its tar members and manifest row) and may run in any thread (the
    encode pool's); `add_entry` takes entries in item order. Tar bytes are uploaded and hashed
    in batches (`flush`; `write` flushes too)."""

    storage: Storage
    prefix: str
    index: int
    layout: str = "webdataset"
    tag: str = ""
    extension: str = "png"  # the job's output format: png, webp or jpg
    content_type: str = "image/png"
    rows: list[dict[str, Any]] = field(default_factory=list)
    _files: list[tuple[str, bytes]] = field(default_factory=list)
    _lines: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tar: Upload | None = None  # opened by the first flush
        self._tar_size = 0
        self._tar_sha256 = hashlib.sha256()  # as it grows: the upload is not read back
        self._pending: list[bytes] = []

    @property
    def name(self) -> str:
        return shard_name(self.index, self.tag)

    def entry(
        self,
        item: int,
        image: bytes,
        meta: dict[str, Any],
        name: str | None = None,
        sha256: str | None = None,
    ) -> ShardEntry:
        """A generated image's entry (`sha256`: its hash, if the encode pool made it already);
        `name` is its file name in `layout=files` (default: the key). Changes nothing here."""
        key = item_key(item)
        digest = sha256 or hashlib.sha256(image).hexdigest()
        if self.layout == "files":
            obj = f"images/{name or f'{key}.{self.extension}'}"
        else:
            # the attempt-free name: the shard's bytes are the same whichever attempt made
            # them; the finaliser writes the committed attempt's key into the manifest
            obj = f"{shard_name(self.index)}.tar#{key}.{self.extension}"
        row = self._row(item, "ok", None, meta)
        row.update(object=obj, sha256=digest, bytes=len(image))
        line = manifest_line(row)
        if self.layout == "files":
            return ShardEntry(row, line, file=(obj, image))
        labels = json.dumps(meta, sort_keys=True).encode()
        members = tar_member(f"{key}.{self.extension}", image) + tar_member(f"{key}.json", labels)
        return ShardEntry(row, line, tar=members)

    def add_entry(self, entry: ShardEntry) -> None:
        """The next item's entry, in item order."""
        self.rows.append(entry.row)
        self._lines.append(entry.line)
        if entry.file is not None:
            self._files.append(entry.file)
        elif entry.tar:
            self._pending.append(entry.tar)

    def add(
        self,
        item: int,
        image: bytes,
        meta: dict[str, Any],
        name: str | None = None,
        sha256: str | None = None,
    ) -> None:
        """`add_entry(entry(...))`: a generated image, made in this thread."""
        self.add_entry(self.entry(item, image, meta, name, sha256))

    def flush(self) -> None:
        """Upload and hash the tar bytes added since the last flush: once per batch of items, not
        per item (each write and hash lets go of the GIL, which the encode pool then holds)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            if self._tar is None:
                self._tar = self.storage.open_upload(f"{self.prefix}{self.name}.tar")
            self._tar.write(data)
            self._tar_sha256.update(data)
            self._tar_size += len(data)

    def fail(self, item: int, error: str, meta: dict[str, Any]) -> None:
        """An item that could not be made (a corrupt source, no person found, ...)."""
        row = self._row(item, "error", error, meta)
        self.rows.append(row)
        self._lines.append(manifest_line(row))

    @staticmethod
    def _row(item: int, status: str, error: str | None, meta: dict[str, Any]) -> dict[str, Any]:
        return {
            "key": item_key(item),
            "item": item,
            "custom_id": meta.get("custom_id"),
            "status": status,
            "error": error,
            "source": meta.get("source"),
            "pose": meta.get("pose"),
            "identity": meta.get("identity"),
            "seed": meta.get("seed"),
            "keypoints": meta.get("keypoints"),
            "labels": None
            if meta.get("labels") is None
            else json.dumps(meta["labels"], sort_keys=True),
            "object": None,
            "sha256": None,
            "bytes": None,
        }

    @property
    def done(self) -> int:
        return sum(r["status"] == "ok" for r in self.rows)

    @property
    def failed(self) -> int:
        return len(self.rows) - self.done

    def close(self) -> None:
        """Drop the tar's upload unless `write` published it (a stopped or failed chunk)."""
        if self._tar is not None:
            self._tar.abort()

    def write(self, made_with: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload the shard, then its commit marker (last, so a marker means a whole shard).
        `made_with` (device, precision, micro-batch size) goes into the marker: the pixels are
        reproducible for the same three."""
        marker: dict[str, Any] = {
            "made_with": made_with or {},
            "chunk": self.index,
            "items": len(self.rows),
            "done": self.done,
            "failed": self.failed,
        }
        try:
            if self.layout == "files":
                for obj, data in self._files:
                    self.storage.put_bytes(self.prefix + obj, data, self.content_type)
            else:
                self.flush()
                self._pending.append(tar_end(self._tar_size))
                self.flush()
                assert self._tar is not None  # the flush of tar_end opened it
                self._tar.finish()
                marker["tar_sha256"] = self._tar_sha256.hexdigest()
        finally:
            self.close()
        lines = b"".join(self._lines)
        self.storage.put_bytes(f"{self.prefix}{self.name}.jsonl", lines, "application/jsonl")
        marker["jsonl_sha256"] = hashlib.sha256(lines).hexdigest()
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        parquet = sink.getvalue()
        self.storage.put_bytes(f"{self.prefix}{self.name}.parquet", parquet)
        marker["parquet_sha256"] = hashlib.sha256(parquet).hexdigest()
        self.storage.put_bytes(
            f"{self.prefix}{self.name}.done.json", json.dumps(marker, sort_keys=True).encode()
        )
        return marker
