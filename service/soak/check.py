"""The soak's verdict: every job of the soak's tenants, read back from the database and the
bucket, against the undisturbed reference run of its spec.

- No job is stuck: each is in a final state.
- Every manifest row names an object that exists and holds bytes with the row's sha256.
- Every ok item is byte-identical to the reference run; no item or key appears twice, in the
  manifest or across the committed tar shards.
- The job's counts are the manifest's, and a completed job lists all of its items.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import text

from service.localstack import BUCKET, STORAGE_PREFIX

FINAL = ("completed", "failed", "cancelled")


@dataclass
class Verdict:
    jobs: int = 0
    items: int = 0  # ok items checked against the reference
    failed_items: int = 0  # manifest rows with an error, and the items of dead chunks
    # last error → chunks that died after max attempts with no committed attempt
    dead_chunks: Counter[str] = field(default_factory=Counter)
    states: Counter[str] = field(default_factory=Counter)
    stuck: int = 0
    mismatches: int = 0  # rows or objects that break a guarantee
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        self.mismatches += 1
        if len(self.problems) < 50:
            self.problems.append(text)


def soak_jobs(engine: Any, tenants: list[str]) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT j.id, j.state, j.seed, j.total_items, j.done_items, j.failed_items "
                "FROM jobs j JOIN tenants t ON t.id = j.tenant_id "
                "WHERE t.name = ANY(:names) ORDER BY j.created_at"
            ),
            {"names": tenants},
        ).mappings()
        return [dict(r) for r in rows]


def chunk_items(engine: Any, job_id: str) -> tuple[list[int], dict[int, tuple[list[int], str]]]:
    """(the items of the job's done chunks, chunk index → (items, last error) of each chunk that
    died of errors with no committed attempt: its items are failed, in errors.jsonl only)."""
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT index, state, output_tag, last_error, item_start, item_stop "
                "FROM chunks WHERE job_id = :job"
            ),
            {"job": job_id},
        ).all()
    done = sorted(i for r in rows if r.state == "done" for i in range(r.item_start, r.item_stop))
    dead = {
        r.index: (list(range(r.item_start, r.item_stop)), str(r.last_error))
        for r in rows
        if r.state == "dead" and r.output_tag is None and r.last_error
    }
    return done, dead


class Bucket:
    """The job outputs in the stack's bucket, each tar read once."""

    def __init__(self, s3: Any) -> None:
        self.s3 = s3

    def get(self, job_id: str, name: str) -> bytes | None:
        try:
            body: bytes = self.s3.get_object(
                Bucket=BUCKET, Key=f"{STORAGE_PREFIX}/jobs/{job_id}/{name}"
            )["Body"].read()
        except self.s3.exceptions.NoSuchKey:
            return None
        return body

    def members(self, job_id: str, tar_key: str) -> dict[str, str] | None:
        """member name → sha256 of a tar shard (None: the object is missing)."""
        body = self.get(job_id, tar_key)
        if body is None:
            return None
        out: dict[str, str] = {}
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            for member in tar.getmembers():
                handle = tar.extractfile(member)
                if handle is not None:
                    out[member.name] = hashlib.sha256(handle.read()).hexdigest()
        return out


def check_job(
    verdict: Verdict,
    job: dict[str, Any],
    reference: dict[int, str],
    bucket: Bucket,
    engine: Any,
) -> None:
    import pyarrow.parquet as pq

    job_id, state = job["id"], job["state"]
    verdict.jobs += 1
    verdict.states[state] += 1
    if state not in FINAL:
        verdict.stuck += 1
        verdict.problem(f"{job_id}: stuck in {state}")
        return
    body = bucket.get(job_id, "manifest.parquet")
    if body is None:
        verdict.problem(f"{job_id} ({state}): no manifest")
        return
    rows = pq.read_table(io.BytesIO(body)).to_pylist()
    for what in ("item", "key"):
        twice = [v for v, n in Counter(r[what] for r in rows).items() if n > 1]
        if twice:
            verdict.problem(f"{job_id}: {what}s twice in the manifest: {twice[:5]}")
    ok = [r for r in rows if r["status"] == "ok"]
    failed = len(rows) - len(ok)
    done, dead = chunk_items(engine, job_id)
    dead_items = sum(len(items) for items, _ in dead.values())
    verdict.items += len(ok)
    verdict.failed_items += failed + dead_items
    verdict.dead_chunks.update(error for _, error in dead.values())
    if (job["done_items"], job["failed_items"]) != (len(ok), failed + dead_items):
        verdict.problem(
            f"{job_id}: counts done={job['done_items']} failed={job['failed_items']}, manifest "
            f"ok={len(ok)} failed={failed}, dead chunks' items {dead_items}"
        )
    errors = [json.loads(line) for line in (bucket.get(job_id, "errors.jsonl") or b"").splitlines()]
    if sorted(e["chunk"] for e in errors if "chunk" in e) != sorted(dead):
        verdict.problem(f"{job_id}: errors.jsonl does not list the dead chunks {sorted(dead)}")
    items = sorted(r["item"] for r in rows)
    if state == "completed":
        listed = sorted(items + [i for chunk, _ in dead.values() for i in chunk])
        if listed != list(range(job["total_items"])):
            verdict.problem(f"{job_id}: completed with {len(listed)} of {job['total_items']} items")
    if state == "cancelled" and items != done:
        verdict.problem(f"{job_id}: the manifest does not list exactly the done chunks' items")
    marker = {"completed": "_SUCCESS", "cancelled": "_CANCELLED"}.get(state)
    if marker and bucket.get(job_id, marker) is None:
        verdict.problem(f"{job_id} ({state}): no {marker}")

    shards: dict[str, dict[str, str] | None] = {}
    seen: set[str] = set()
    for row in ok:
        if row["sha256"] != reference.get(row["item"]):
            verdict.problem(f"{job_id}: item {row['item']} differs from the reference run")
        tar_key, _, member = str(row["object"]).partition("#")
        if tar_key not in shards:
            shards[tar_key] = bucket.members(job_id, tar_key)
        found = shards[tar_key]
        if found is None:
            verdict.problem(f"{job_id}: {tar_key} is missing")
        elif found.get(member) != row["sha256"]:
            verdict.problem(f"{job_id}: {row['object']} does not hold the manifest's bytes")
    for members in shards.values():
        for name in members or {}:
            if name.endswith(".json"):
                continue
            if name in seen:
                verdict.problem(f"{job_id}: {name} is in two committed shards")
            seen.add(name)
