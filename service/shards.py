"""Job outputs (DESIGN §4): one shard per chunk, then a manifest written by the finaliser.

A shard is `shards/NNNNNN-<tag>.tar` (WebDataset: `<key>.<png|webp|jpg>` + `<key>.json` per
item), `shards/NNNNNN-<tag>.parquet` (one row per item, failed ones included) and
`shards/NNNNNN-<tag>.done.json` (the commit marker: counts and the SHA-256 of the other two).
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
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from service.storage import Storage

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
    r"shards/(?P<index>\d{6})(?:-(?P<tag>[0-9a-f]+))?\.(?:tar|parquet|done\.json)"
)


def parse_shard_key(key: str) -> tuple[int, str] | None:
    """(chunk index, attempt tag) of a shard object key relative to the job's folder."""
    found = SHARD_KEY.fullmatch(key)
    return (int(found["index"]), found["tag"] or "") if found else None


def sha256_of(handle: Any, block: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    while piece := handle.read(block):
        digest.update(piece)
    return digest.hexdigest()


def item_key(item: int) -> str:
    """WebDataset keys may not contain dots; zero-padded so that keys sort in item order."""
    return f"{item:010d}"


@dataclass
class ShardWriter:
    """Collects one chunk's items, then writes its objects under `prefix` (the job's folder), with
    `tag` (the attempt) in their keys. The tar grows in a temporary file, not in memory."""

    storage: Storage
    prefix: str
    index: int
    layout: str = "webdataset"
    tag: str = ""
    extension: str = "png"  # the job's output format: png, webp or jpg
    content_type: str = "image/png"
    rows: list[dict[str, Any]] = field(default_factory=list)
    _files: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._tar = tempfile.NamedTemporaryFile(prefix="dpig-shard-", suffix=".tar")
        self._archive = tarfile.open(fileobj=self._tar, mode="w", format=tarfile.USTAR_FORMAT)

    @property
    def name(self) -> str:
        return shard_name(self.index, self.tag)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._archive.addfile(info, io.BytesIO(data))

    def add(
        self,
        item: int,
        image: bytes,
        meta: dict[str, Any],
        name: str | None = None,
        sha256: str | None = None,
    ) -> None:
        """A generated image (`sha256`: its hash, if the encode pool made it already); `name` is
        its file name in `layout=files` (default: the key)."""
        key = item_key(item)
        if self.layout == "files":
            obj = f"images/{name or f'{key}.{self.extension}'}"
            self._files.append((obj, image))
        else:
            # the attempt-free name: the shard's bytes are the same whichever attempt made
            # them; the finaliser writes the committed attempt's key into the manifest
            obj = f"{shard_name(self.index)}.tar#{key}.{self.extension}"
            self._add(f"{key}.{self.extension}", image)
            self._add(f"{key}.json", json.dumps(meta, sort_keys=True).encode())
        digest = sha256 or hashlib.sha256(image).hexdigest()
        self.rows.append(
            self._row(item, "ok", None, meta)
            | {"object": obj, "sha256": digest, "bytes": len(image)}
        )

    def fail(self, item: int, error: str, meta: dict[str, Any]) -> None:
        """An item that could not be made (a corrupt source, no person found, ...)."""
        self.rows.append(self._row(item, "error", error, meta))

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
        self._tar.close()

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
                self._archive.close()
                self._tar.flush()
                self._tar.seek(0)
                marker["tar_sha256"] = sha256_of(self._tar)
                self.storage.put_file(f"{self.prefix}{self.name}.tar", self._tar.name)
        finally:
            self.close()
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
