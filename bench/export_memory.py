"""Peak memory of `dpig export` against the number of items: it streams, so it should not grow.

Makes a real sample job on the embedded default (SQLite + local folder, `--detach`), fills its
chunks with synthetic shards (one small PNG and a full label set per item, written by the service's
own ShardWriter, so no model runs), marks it completed, then runs `dpig export JOB --format coco`
(and `files`) in a fresh process and reads that process's peak RSS.

    python bench/export_memory.py --items 10000 100000
Last line: export_peak_rss_mib=<items>:<MiB>,... for each size (coco).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _make_job(home: Path, items: int, chunk: int) -> str:
    from sqlalchemy import update

    from service.db import Chunk, ChunkState, Job, JobState, utcnow
    from service.jobs import job_prefix, open_context, submit, tenant_id
    from service.settings import Settings
    from service.shards import ShardWriter
    from service.specs import parse_spec

    ctx = open_context(Settings.from_values(home=home), embedded=True)
    view = submit(
        ctx, tenant_id(ctx), parse_spec({"kind": "sample", "count": items, "chunk_size": chunk})
    )
    buf = io.BytesIO()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (64, 32, 3), dtype=np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    rcv = [[float(8 + 3 * k), float(4 + k % 20), 1.0] for k in range(18)]
    for index, start in enumerate(range(0, items, chunk)):
        writer = ShardWriter(ctx.storage, job_prefix(view.id), index)
        for item in range(start, min(start + chunk, items)):
            seeds = {"fg": item, "bg": item, "pose": item}
            meta = {"item": item, "seed": 0, "keypoints": rcv, "labels": {"z_seeds": seeds}}
            writer.add(item, png, meta)
        writer.write()
    with ctx.session() as session:
        session.execute(update(Chunk).where(Chunk.job_id == view.id).values(state=ChunkState.DONE))
        session.execute(
            update(Job)
            .where(Job.id == view.id)
            .values(state=JobState.COMPLETED, done_items=items, finished_at=utcnow())
        )
    return view.id


def _export(home: Path, job_id: str, fmt: str, out: Path) -> tuple[float, float]:
    """Seconds and peak RSS (MiB) of `dpig export` in a fresh process."""
    env = {**os.environ, "DPIG_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("DPIG_API_URL", None)
    code = (
        "import resource, sys; from cli.main import app\n"
        "try:\n    app()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n"
        "print('maxrss_kib', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    command = [sys.executable, "-c", code, "export", job_id, "--format", fmt, "--out", str(out)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"export failed: {done.stderr}")
    kib = int(done.stderr.split("maxrss_kib")[-1].split()[0])
    return seconds, kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--chunk-size", type=int, default=1024)
    args = parser.parse_args()
    figures = []
    for items in args.items:
        with tempfile.TemporaryDirectory(prefix="dpig-export-bench-") as folder:
            home = Path(folder) / "home"
            job_id = _make_job(home, items, args.chunk_size)
            for fmt in ("coco", "files"):
                seconds, mib = _export(home, job_id, fmt, Path(folder) / fmt)
                print(json.dumps({"items": items, "format": fmt, "seconds": round(seconds, 1),
                                  "peak_rss_mib": round(mib, 1)}))  # fmt: skip
                if fmt == "coco":
                    figures.append(f"{items}:{mib:.0f}")
    print("export_peak_rss_mib=" + ",".join(figures))


if __name__ == "__main__":
    main()
