"""Finaliser memory and time on a synthetic job of `--items` items (embedded default: SQLite +
a local folder).

Builds the job without a model: one committed shard per chunk of 1,024 items (a real parquet of
manifest rows, their manifest lines as a worker makes them (`--without-lines`: as a worker from
before them), a small tar and a done marker with their SHA-256, under the attempt-tagged keys),
then finalises it in a fresh process (so the build does not count) and reports that process's
peak resident memory and the finalisation's wall time. The finaliser streams: memory should not
grow with the job.

    python bench/finalize.py --items 10000000 [--without-lines]
Last line: peak_rss_mib=<n> seconds=<s>.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TAG = "0123456789abcdef"
# what a sampled person's row carries: 18 keypoints to 1/100 pixel, and its z seeds
KEYPOINTS = [[round(11.37 * j % 128, 2), round(7.93 * j % 64, 2), 1.0] for j in range(18)]
LABELS = json.dumps({"fixed": {}, "z_seeds": {"bg": 2**62 + 1, "fg": 2**62 + 3, "pose": 2**61}})


def _settings(work: Path) -> object:
    from service.settings import Settings

    return Settings.from_values(
        home=work / "home",
        database_url=f"sqlite:///{work / 'dpig.db'}",
        storage_url=(work / "outputs").as_uri(),
        max_items_per_job=10**9,
        max_chunks_per_job=10**7,
    )


def _tar() -> bytes:
    sink = io.BytesIO()
    with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        data = b"\x89PNG placeholder" * 64
        info = tarfile.TarInfo("0000000000.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return sink.getvalue()


def build(work: Path, items: int, chunk_size: int, *, lines: bool = True) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from sqlalchemy import update

    from service.db import Chunk, Job
    from service.jobs import job_prefix, open_context, submit, tenant_id
    from service.shards import MANIFEST_SCHEMA, item_key, manifest_line, shard_name
    from service.specs import parse_spec

    ctx = open_context(_settings(work), embedded=True)  # type: ignore[arg-type]
    spec = parse_spec({"kind": "sample", "count": items, "chunk_size": chunk_size, "seed": 1})
    job = submit(ctx, tenant_id(ctx), spec).id
    folder = work / "outputs" / job_prefix(job) / "shards"
    folder.mkdir(parents=True, exist_ok=True)
    tar = _tar()
    tar_sha = hashlib.sha256(tar).hexdigest()
    for index, start in enumerate(range(0, items, chunk_size)):
        stop = min(start + chunk_size, items)
        keys = [item_key(i) for i in range(start, stop)]
        n = stop - start
        columns = {
            "key": keys,
            "item": list(range(start, stop)),
            "custom_id": [None] * n,
            "status": ["ok"] * n,
            "error": [None] * n,
            "source": [None] * n,
            "pose": [None] * n,
            "identity": [None] * n,
            "seed": [1] * n,
            "keypoints": [KEYPOINTS] * n,
            "labels": [LABELS] * n,
            "object": [f"{shard_name(index)}.tar#{k}.png" for k in keys],
            "sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys],
            "bytes": [1024] * n,
        }
        table = pa.Table.from_pydict(columns, schema=MANIFEST_SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink)
        parquet = sink.getvalue()
        name = folder / Path(shard_name(index, TAG)).name
        Path(f"{name}.tar").write_bytes(tar)
        Path(f"{name}.parquet").write_bytes(parquet)
        marker = {
            "chunk": index,
            "items": n,
            "done": n,
            "failed": 0,
            "tar_sha256": tar_sha,
            "parquet_sha256": hashlib.sha256(parquet).hexdigest(),
        }
        if lines:
            values = zip(*columns.values(), strict=True)
            rows = (dict(zip(columns, row, strict=True)) for row in values)
            jsonl = b"".join(manifest_line(row) for row in rows)
            Path(f"{name}.jsonl").write_bytes(jsonl)
            marker["jsonl_sha256"] = hashlib.sha256(jsonl).hexdigest()
        Path(f"{name}.done.json").write_text(json.dumps(marker, sort_keys=True))
    with ctx.session() as session:
        session.execute(
            update(Chunk)
            .where(Chunk.job_id == job)
            .values(
                state="done",
                output_tag=TAG,
                done_items=Chunk.item_stop - Chunk.item_start,
                failed_items=0,
            )
        )
        session.execute(update(Job).where(Job.id == job).values(state="running"))
    return job


def finalize(work: Path, job: str) -> None:
    from service.jobs import job_state, maybe_finalize, open_context

    ctx = open_context(_settings(work), embedded=True, migrate=False)  # type: ignore[arg-type]
    started = time.perf_counter()
    assert maybe_finalize(ctx, job), "the job was not finalised"
    seconds = time.perf_counter() - started
    assert job_state(ctx, job) == "completed", job_state(ctx, job)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sys.stdout.write(json.dumps({"peak_rss_mib": round(peak_kib / 1024), "seconds": seconds}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=10_000_000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--without-lines", action="store_true", help="shards as workers made them before lines"
    )
    parser.add_argument("--finalize", nargs=2, metavar=("WORK", "JOB"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.finalize:
        finalize(Path(args.finalize[0]), args.finalize[1])
        return
    work = Path(tempfile.mkdtemp(prefix="dpig-finalize-bench-"))
    try:
        started = time.perf_counter()
        job = build(work, args.items, args.chunk_size, lines=not args.without_lines)
        built = time.perf_counter() - started
        out = subprocess.run(
            [sys.executable, __file__, "--finalize", str(work), job],
            check=True,
            capture_output=True,
            text=True,
            env=os.environ | {"PYTHONPATH": str(ROOT)},
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        manifest = work / "outputs" / "jobs" / job / "manifest.parquet"
        print(
            f"items={args.items} chunks={-(-args.items // args.chunk_size)} "  # noqa: T201
            f"build_seconds={built:.0f} manifest_mib={manifest.stat().st_size / 2**20:.1f}"
        )
        print(f"peak_rss_mib={result['peak_rss_mib']} seconds={result['seconds']:.1f}")  # noqa: T201
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
