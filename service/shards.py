"""Job outputs (DESIGN §4): one shard per chunk, then a manifest written by the finaliser.

A shard is `shards/NNNNNN.tar` (WebDataset: `<key>.<png|webp|jpg>` + `<key>.json` per item),
`shards/NNNNNN.parquet` (one row per item, failed ones included) and `shards/NNNNNN.done.json`
(the commit marker: counts and the SHA-256 of the other two). With `layout=files` each image is
its own object under `images/` instead of the tar. Everything is byte-for-byte reproducible: tar
headers carry fixed times and owners, PNGs no timestamps, and the rows come in item order.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
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


def shard_name(index: int) -> str:
    return f"shards/{index:06d}"


def item_key(item: int) -> str:
    """WebDataset keys may not contain dots; zero-padded so that keys sort in item order."""
    return f"{item:010d}"


@dataclass
class ShardWriter:
    """Collects one chunk's items, then writes its objects under `prefix` (the job's folder)."""

    storage: Storage
    prefix: str
    index: int
    layout: str = "webdataset"
    extension: str = "png"  # the job's output format: png, webp or jpg
    content_type: str = "image/png"
    rows: list[dict[str, Any]] = field(default_factory=list)
    _tar: io.BytesIO = field(default_factory=io.BytesIO)
    _files: list[tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._archive = tarfile.open(fileobj=self._tar, mode="w", format=tarfile.USTAR_FORMAT)

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

    def write(self, made_with: dict[str, Any] | None = None) -> dict[str, Any]:
        """Upload the shard, then its commit marker (last, so a marker means a whole shard).
        `made_with` (device, precision, micro-batch size) goes into the marker: the pixels are
        reproducible for the same three."""
        name = shard_name(self.index)
        marker: dict[str, Any] = {
            "made_with": made_with or {},
            "chunk": self.index,
            "items": len(self.rows),
            "done": self.done,
            "failed": self.failed,
        }
        if self.layout == "files":
            for obj, data in self._files:
                self.storage.put_bytes(self.prefix + obj, data, self.content_type)
        else:
            self._archive.close()
            tar = self._tar.getvalue()
            self.storage.put_bytes(f"{self.prefix}{name}.tar", tar, "application/x-tar")
            marker["tar_sha256"] = hashlib.sha256(tar).hexdigest()
        table = pa.Table.from_pylist(self.rows, schema=MANIFEST_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        parquet = sink.getvalue()
        self.storage.put_bytes(f"{self.prefix}{name}.parquet", parquet)
        marker["parquet_sha256"] = hashlib.sha256(parquet).hexdigest()
        self.storage.put_bytes(
            f"{self.prefix}{name}.done.json", json.dumps(marker, sort_keys=True).encode()
        )
        return marker


def finalize_outputs(
    storage: Storage,
    prefix: str,
    done_chunks: list[int],
    dead_chunks: list[tuple[int, str | None]],
    *,
    cancelled: bool,
    expired: list[tuple[int, int]] | None = None,
) -> dict[str, int]:
    """manifest.parquet and manifest.jsonl (every item of every committed shard, in item order),
    errors.jsonl (failed items and dead chunks), and one of _SUCCESS / _CANCELLED / _FAILED.
    An expired job (`expired`: the item ranges never made) gets a row with status `expired` for
    each of those items, and _EXPIRED."""
    tables = []
    for index in sorted(done_chunks):
        data = storage.get_bytes(f"{prefix}{shard_name(index)}.parquet")
        tables.append(pq.read_table(io.BytesIO(data)))
    # shards written before a column was added get it as nulls
    table = (
        pa.concat_tables(tables, promote_options="default")
        if tables
        else MANIFEST_SCHEMA.empty_table()
    )
    if expired:
        unmade = [
            ShardWriter._row(item, "expired", None, {})
            for start, stop in expired
            for item in range(start, stop)
        ]
        table = pa.concat_tables(
            [table, pa.Table.from_pylist(unmade, schema=table.schema)]
        ).sort_by("item")
    sink = io.BytesIO()
    pq.write_table(table, sink)
    storage.put_bytes(prefix + "manifest.parquet", sink.getvalue())
    rows = table.to_pylist()
    storage.put_bytes(
        prefix + "manifest.jsonl",
        "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode(),
    )
    errors = [
        json.dumps(
            {"key": r["key"], "item": r["item"], "custom_id": r["custom_id"], "error": r["error"]}
        )
        + "\n"
        for r in rows
        if r["status"] == "error"
    ]
    errors += [
        json.dumps({"chunk": i, "error": e or "unknown"}) + "\n"
        for i, e in dead_chunks
        if not cancelled or e
    ]
    storage.put_bytes(prefix + "errors.jsonl", "".join(errors).encode())
    done = sum(r["status"] == "ok" for r in rows)
    failed = sum(r["status"] == "error" for r in rows)
    summary = {"items": len(rows), "done": done, "failed": failed}
    if expired is not None:
        summary["expired"] = len(rows) - done - failed
        marker = "_EXPIRED"
    else:
        marker = "_CANCELLED" if cancelled else ("_SUCCESS" if done else "_FAILED")
    storage.put_bytes(prefix + marker, json.dumps(summary).encode())
    return summary
