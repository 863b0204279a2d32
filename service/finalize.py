"""The finaliser (DESIGN §4): once a job's chunks are all terminal, write manifest.parquet,
manifest.jsonl, errors.jsonl and one of _SUCCESS / _CANCELLED / _FAILED, then set the job's
final state.

- One finaliser at a time: it takes the job's finaliser lease (`finalize_token`, expiring in
  database time); the final state is set only while that lease holds and the job is still in the
  state the finaliser found, so a retry or a second finaliser can never be overwritten.
- Only each chunk's committed attempt (`chunks.output_tag`) is read, after checking its done
  marker's SHA-256 of the tar and the parquet; a shard that fails the check is run again instead.
- Streaming, in constant memory whatever the job's size: shard parquets are read one at a time
  in row batches, the manifests grow in temporary files and are uploaded as files (multipart).
- Shard objects of attempts that never became canonical (stale or failed workers) are deleted.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from sqlalchemy import func, select, update

from service.chunks import recount, rowcount
from service.context import Context, db_now
from service.db import TERMINAL_JOB_STATES, Chunk, ChunkState, Job, JobState
from service.shards import MANIFEST_SCHEMA, ShardWriter, parse_shard_key, sha256_of, shard_name
from service.storage import NotFound, Storage

log = logging.getLogger(__name__)
ROW_GROUP_ROWS = 16384


@dataclass(frozen=True)
class ChunkOutput:
    """A chunk as the finaliser sees it; `tag` is None when no attempt ever committed."""

    chunk_id: int
    index: int
    state: str
    tag: str | None
    last_error: str | None
    item_start: int = 0
    item_stop: int = 0


@dataclass
class Written:
    items: int = 0
    done: int = 0
    expired: int = 0
    corrupt: dict[int, str] = field(default_factory=dict)  # chunk id → why
    orphans: int = 0

    @property
    def failed(self) -> int:
        return self.items - self.done - self.expired


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}/"


def maybe_finalize(ctx: Context, job_id: str) -> bool:
    """Finalise a job whose chunks are all terminal (a cancelled one: none running), unless
    another finaliser holds its lease. Returns whether this call set the final state."""
    from service import webhooks
    from service.retention import EXPIRED_ERROR  # retention imports the job service

    token = str(uuid.uuid4())
    lease = timedelta(seconds=ctx.settings.lease_seconds)
    with ctx.session() as session:
        job = session.get(Job, job_id, with_for_update=True)
        if job is None or job.state in TERMINAL_JOB_STATES or job.state == JobState.PAUSED:
            return False
        now = db_now(session)
        if job.finalize_token is not None and (job.finalize_expires_at or now) > now:
            return False  # another finaliser is at work
        cancelled = job.state == JobState.CANCELLING
        # a cancelled job's pending chunks never run; it waits only for the running ones
        blocking = (ChunkState.RUNNING,) if cancelled else (ChunkState.PENDING, ChunkState.RUNNING)
        open_chunks = session.scalar(
            select(func.count())
            .select_from(Chunk)
            .where(Chunk.job_id == job_id, Chunk.state.in_(blocking))
        )
        if open_chunks:
            return False
        expected = JobState.CANCELLING if cancelled else JobState.FINALIZING
        expiring = cancelled and job.error == EXPIRED_ERROR
        total = job.total_items
        job.state, job.finalize_token, job.finalize_expires_at = expected, token, now + lease
        chunks = [
            _legacy_untagged(ChunkOutput(*row))
            for row in session.execute(
                select(
                    Chunk.id,
                    Chunk.index,
                    Chunk.state,
                    Chunk.output_tag,
                    Chunk.last_error,
                    Chunk.item_start,
                    Chunk.item_stop,
                )
                .where(Chunk.job_id == job_id)
                .order_by(Chunk.index)
            )
        ]
    renew = _renewer(ctx, job_id, token, lease)
    try:
        written = write_outputs(
            ctx.storage,
            job_prefix(job_id),
            chunks,
            cancelled=cancelled,
            expiring=expiring,
            renew=renew,
        )
    except BaseException:
        _release(ctx, job_id, token)
        raise
    if written.corrupt:
        return _rerun_corrupt(ctx, job_id, token, written.corrupt, cancelled=cancelled)
    with ctx.session() as session:
        values: dict[str, Any] = {"state": JobState.COMPLETED, "error": None}
        if expiring:
            values = {"state": JobState.EXPIRED}  # keeps its error, EXPIRED_ERROR
        elif cancelled:
            values["state"] = JobState.CANCELLED
        elif written.done == 0 and total:
            values = {"state": JobState.FAILED, "error": "every item failed (see errors.jsonl)"}
        finished = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.finalize_token == token, Job.state == expected)
            .values(
                finished_at=db_now(session),
                finalize_token=None,
                finalize_expires_at=None,
                **values,
            )
        )
        if not rowcount(finished):
            return False
        job = session.get(Job, job_id)
        assert job is not None
        webhooks.enqueue(session, job)
        return True


def _legacy_untagged(chunk: ChunkOutput) -> ChunkOutput:
    """A done chunk with no tag was committed by a worker from before attempt tags (a rolling
    upgrade): its shard is under the untagged keys, never an orphan."""
    if chunk.state == ChunkState.DONE and chunk.tag is None:
        return ChunkOutput(
            chunk.chunk_id,
            chunk.index,
            chunk.state,
            "",
            chunk.last_error,
            chunk.item_start,
            chunk.item_stop,
        )
    return chunk


def _renewer(ctx: Context, job_id: str, token: str, lease: timedelta) -> Callable[[], None]:
    """Extend the finaliser's lease once a third of it has passed (a 10^7-item job takes
    minutes to finalise)."""
    last = {"at": time.monotonic()}

    def renew() -> None:
        if time.monotonic() - last["at"] < lease.total_seconds() / 3:
            return
        with ctx.session() as session:
            held = session.execute(
                update(Job)
                .where(Job.id == job_id, Job.finalize_token == token)
                .values(finalize_expires_at=db_now(session) + lease)
            )
            if not rowcount(held):
                raise FinalizerLost(f"job {job_id}: another finaliser took over")
        last["at"] = time.monotonic()

    return renew


class FinalizerLost(RuntimeError):
    """This finaliser's lease expired and another one took the job over."""


def _release(ctx: Context, job_id: str, token: str) -> None:
    """Give the finaliser lease back after a failure: the next tick tries again at once."""
    with ctx.session() as session:
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.finalize_token == token)
            .values(finalize_token=None, finalize_expires_at=None)
        )


def _rerun_corrupt(
    ctx: Context, job_id: str, token: str, corrupt: dict[int, str], *, cancelled: bool
) -> bool:
    """Shards that fail their hash check lose their commit: the chunks run again (or, in a
    cancelled job, are dead-lettered), and the job is finalised later."""
    log.warning("job %s: %d shards failed their check: %s", job_id, len(corrupt), corrupt)
    with ctx.session() as session:
        for chunk_id, why in corrupt.items():
            session.execute(
                update(Chunk)
                .where(Chunk.id == chunk_id)
                .values(
                    state=ChunkState.DEAD if cancelled else ChunkState.PENDING,
                    output_tag=None,
                    done_items=0,
                    failed_items=0,
                    attempts=0,
                    published_at=None,
                    last_error=why,
                )
            )
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.finalize_token == token)
            .values(
                state=JobState.CANCELLING if cancelled else JobState.RUNNING,
                finalize_token=None,
                finalize_expires_at=None,
            )
        )
    recount(ctx, job_id)
    return False


def _checked_shard(
    storage: Storage, prefix: str, chunk: ChunkOutput
) -> tuple[bytes, bytes | None] | str:
    """The committed attempt's parquet and manifest lines (None from a worker that did not make
    them), or why its shard cannot be trusted."""
    assert chunk.tag is not None
    name = prefix + shard_name(chunk.index, chunk.tag)
    lines = None
    try:
        marker = json.loads(storage.get_bytes(name + ".done.json"))
        parquet = storage.get_bytes(name + ".parquet")
        if sha256_of(io.BytesIO(parquet)) != marker.get("parquet_sha256"):
            return f"{name}.parquet does not match its done marker's sha256"
        if "jsonl_sha256" in marker:
            lines = storage.get_bytes(name + ".jsonl")
            if sha256_of(io.BytesIO(lines)) != marker["jsonl_sha256"]:
                return f"{name}.jsonl does not match its done marker's sha256"
        if "tar_sha256" in marker:
            with storage.open_read(name + ".tar") as tar:
                if sha256_of(tar) != marker["tar_sha256"]:
                    return f"{name}.tar does not match its done marker's sha256"
    except NotFound as exc:
        return f"shard object missing: {exc}"
    except ValueError as exc:
        return f"{name}.done.json is not valid JSON: {exc}"
    return parquet, lines


def write_outputs(
    storage: Storage,
    prefix: str,
    chunks: list[ChunkOutput],
    *,
    cancelled: bool,
    expiring: bool = False,
    renew: Callable[[], None] = lambda: None,
) -> Written:
    """Stream every committed shard's rows (in item order) into manifest.parquet, manifest.jsonl
    and errors.jsonl, add a line per chunk with no committed attempt, write the marker, then
    delete orphan shard objects. Nothing is written when a shard fails its check.
    An expiring job's chunks that never ran (pending, or stopped without an error) get a row
    with status `expired` per item, and the marker is _EXPIRED."""
    written = Written()
    with (
        tempfile.NamedTemporaryFile(suffix=".parquet") as parquet_file,
        tempfile.NamedTemporaryFile("wb", suffix=".jsonl") as manifest,
        tempfile.NamedTemporaryFile("w", suffix=".jsonl") as errors,
    ):
        writer = pq.ParquetWriter(parquet_file.name, MANIFEST_SCHEMA)
        pending: list[pa.RecordBatch] = []
        pending_rows = 0
        for chunk in chunks:
            renew()
            if chunk.tag is None and expiring and _unmade(chunk):
                batch = _expired_rows(chunk)
                _write_rows(batch, manifest, errors, written)
                pending.append(batch)
                pending_rows += batch.num_rows
                continue
            if chunk.tag is None:
                if chunk.state == ChunkState.DEAD and (not cancelled or chunk.last_error):
                    line = {"chunk": chunk.index, "error": chunk.last_error or "unknown"}
                    errors.write(json.dumps(line) + "\n")
                continue
            checked = _checked_shard(storage, prefix, chunk)
            if isinstance(checked, str):
                written.corrupt[chunk.chunk_id] = checked
                continue
            parquet, lines = checked
            for batch in pq.ParquetFile(io.BytesIO(parquet)).iter_batches(batch_size=4096):
                batch = _with_committed_key(batch, chunk)
                if lines is None:
                    _write_rows(batch, manifest, errors, written)
                else:
                    _count_rows(batch, errors, written)
                pending.append(batch)
                pending_rows += batch.num_rows
            if lines is not None:
                manifest.write(_with_committed_object(lines, chunk))
            if pending_rows >= ROW_GROUP_ROWS:
                writer.write_table(pa.Table.from_batches(pending, MANIFEST_SCHEMA))
                pending, pending_rows = [], 0
        if pending:
            writer.write_table(pa.Table.from_batches(pending, MANIFEST_SCHEMA))
        writer.close()
        if written.corrupt:
            return written
        manifest.flush()
        errors.flush()
        storage.put_file(prefix + "manifest.parquet", parquet_file.name)
        storage.put_file(prefix + "manifest.jsonl", manifest.name)
        storage.put_file(prefix + "errors.jsonl", errors.name)
    summary: dict[str, Any] = {
        "items": written.items,
        "done": written.done,
        "failed": written.failed,
    }
    # the committed attempts' shards, so a reader never mistakes a stale upload for one
    summary["shards"] = [shard_name(c.index, c.tag) for c in chunks if c.tag is not None]
    if expiring:
        summary["expired"] = written.expired
        marker = "_EXPIRED"
    else:
        marker = "_CANCELLED" if cancelled else ("_SUCCESS" if written.done else "_FAILED")
    storage.put_bytes(prefix + marker, json.dumps(summary).encode())
    written.orphans = delete_orphans(storage, prefix, chunks)
    return written


def _unmade(chunk: ChunkOutput) -> bool:
    """A chunk stopped before it ran: pending, or dead without an error (stopped by the stop)."""
    return chunk.state == ChunkState.PENDING or (
        chunk.state == ChunkState.DEAD and not chunk.last_error
    )


def _expired_rows(chunk: ChunkOutput) -> pa.RecordBatch:
    rows = [
        ShardWriter._row(item, "expired", None, {})
        for item in range(chunk.item_start, chunk.item_stop)
    ]
    return pa.RecordBatch.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _conformed(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch in the manifest's schema; columns a shard from an older version lacks are null."""
    if batch.schema == MANIFEST_SCHEMA:
        return batch
    columns = [
        batch.column(f.name).cast(f.type)
        if f.name in batch.schema.names
        else pa.nulls(batch.num_rows, f.type)
        for f in MANIFEST_SCHEMA
    ]
    return pa.RecordBatch.from_arrays(columns, schema=MANIFEST_SCHEMA)


def _with_committed_key(batch: pa.RecordBatch, chunk: ChunkOutput) -> pa.RecordBatch:
    """Rows name their tar by the attempt-free `shards/NNNNNN.tar`; the manifest names the
    committed attempt's object."""
    batch = _conformed(batch)
    if not chunk.tag:
        return batch
    where = MANIFEST_SCHEMA.get_field_index("object")
    objects = pc.replace_substring(
        batch.column(where),
        pattern=f"{shard_name(chunk.index)}.tar#",
        replacement=f"{shard_name(chunk.index, chunk.tag)}.tar#",
    )
    return batch.set_column(where, "object", objects)


def _with_committed_object(lines: bytes, chunk: ChunkOutput) -> bytes:
    """A shard's manifest lines with the committed attempt's tar in `object`. A JSON string
    escapes its quotes, so `"object": "` can only be that key."""
    if not chunk.tag:
        return lines
    free, tagged = shard_name(chunk.index), shard_name(chunk.index, chunk.tag)
    return lines.replace(f'"object": "{free}.tar#'.encode(), f'"object": "{tagged}.tar#'.encode())


def _write_rows(batch: pa.RecordBatch, manifest: Any, errors: Any, written: Written) -> None:
    """Rows of a shard without manifest lines (an older worker's), or of unmade chunks."""
    for row in batch.to_pylist():
        manifest.write(json.dumps(row, sort_keys=True).encode() + b"\n")
        written.items += 1
        if row["status"] == "ok":
            written.done += 1
        elif row["status"] == "expired":
            written.expired += 1
        else:
            _write_error(row, errors)


def _count_rows(batch: pa.RecordBatch, errors: Any, written: Written) -> None:
    """What `_write_rows` does but the manifest lines, column-wise: only failed rows are read."""
    status = batch.column("status")
    ok, expired = pc.equal(status, "ok"), pc.equal(status, "expired")
    written.items += batch.num_rows
    written.done += pc.sum(ok).as_py() or 0
    written.expired += pc.sum(expired).as_py() or 0
    failed = pc.invert(pc.or_(ok, expired))
    if pc.any(failed).as_py():
        for row in batch.filter(failed).to_pylist():
            _write_error(row, errors)


def _write_error(row: dict[str, Any], errors: Any) -> None:
    line = {k: row[k] for k in ("key", "item", "custom_id", "error")}
    errors.write(json.dumps(line) + "\n")


def delete_orphans(storage: Storage, prefix: str, chunks: list[ChunkOutput]) -> int:
    """Delete shard objects of attempts that are not their chunk's committed one (a worker that
    lost its lease, an attempt that failed after uploading). Returns how many."""
    canonical = {c.index: c.tag for c in chunks}
    orphans = []
    for key in storage.iter_keys(prefix + "shards/"):
        parsed = parse_shard_key(key.removeprefix(prefix))
        if parsed is not None and canonical.get(parsed[0], None) != parsed[1]:
            orphans.append(key)
    for key in orphans:
        storage.delete_prefix(key)
    return len(orphans)
