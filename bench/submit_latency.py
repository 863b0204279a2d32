"""Submit latency of a large pose-grid job on the embedded default (SQLite + local folder).

Writes `--sources` small source images and a poses file so that sources × poses = `--items`, then
times `dpig submit --pose-grid ... --detach` end to end in a fresh process (Python start-up and
imports included) and, inside one process, the submit call itself (validation, source listing,
job.json, the frozen source list and the chunk rows). Nothing per item is written at submit, so
the time grows with the number of chunks, not of items.

    python bench/submit_latency.py --items 1000000
Last line: submit_latency_s=<seconds of the in-process submit>.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _pose(rng: np.random.Generator, height: int, width: int) -> list[list[float]]:
    rows = rng.uniform(4, height - 4, 18)
    cols = rng.uniform(2, width - 2, 18)
    return [[float(r), float(c), 1.0] for r, c in zip(rows, cols, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--sources", type=int, default=1000)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "submit_latency.json"
    )
    args = parser.parse_args()
    poses_needed = math.ceil(args.items / args.sources)
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="dpig-submit-bench-"))
    images = work / "images"
    images.mkdir()
    tiny = Image.new("RGB", (32, 64), (128, 128, 128))
    for i in range(args.sources):
        tiny.save(images / f"{i:06d}.png")
    keypoints = {f"{i:06d}.png": _pose(rng, 64, 32) for i in range(args.sources)}
    poses = [
        {"id": f"p{j}", "keypoints": _pose(rng, 64, 32), "height": 64, "width": 32}
        for j in range(poses_needed)
    ]
    spec = {
        "kind": "pose_grid",
        "images": str(images),
        "poses": poses,
        "source_keypoints": keypoints,
        "chunk_size": args.chunk_size,
    }
    poses_file = work / "poses.json"
    poses_file.write_text(
        json.dumps(
            {
                "format": "dpig-poses/1",
                "height": 64,
                "width": 32,
                "poses": [{"id": p["id"], "rcv": p["keypoints"]} for p in poses],
            }
        )
    )

    from service.jobs import open_context, submit, tenant_id
    from service.settings import Settings
    from service.specs import parse_spec

    settings = Settings.from_values(home=work / "home")
    ctx = open_context(settings, embedded=True)  # creates and migrates the database once
    tenant = tenant_id(ctx)
    started = time.perf_counter()
    view = submit(ctx, tenant, parse_spec(spec))
    in_process = time.perf_counter() - started
    assert view.total_items == args.sources * poses_needed, view.total_items
    chunks = math.ceil(view.total_items / args.chunk_size)

    cli = None
    keypoints_file = work / "keypoints.json"
    keypoints_file.write_text(
        json.dumps(
            {
                "format": "dpig-poses/1",
                "height": 64,
                "width": 32,
                "poses": [{"id": k, "rcv": v} for k, v in keypoints.items()],
            }
        )
    )
    command = [
        sys.executable,
        "-m",
        "cli.main",
        "submit",
        "--pose-grid",
        str(poses_file),
        "--images",
        str(images),
        "--keypoints",
        str(keypoints_file),
        "--detach",
        "--chunk-size",
        str(args.chunk_size),
        "--json",
    ]
    env = {**os.environ, "DPIG_HOME": str(work / "home")}
    env.pop("DPIG_API_URL", None)
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode == 0:
        cli = time.perf_counter() - started
    else:
        print(f"CLI submit failed (exit {done.returncode}): {done.stderr.strip()[-300:]}")

    result = {
        "items": view.total_items,
        "sources": args.sources,
        "poses": poses_needed,
        "chunks": chunks,
        "submit_in_process_s": round(in_process, 4),
        "submit_cli_process_s": None if cli is None else round(cli, 3),
        "database": "SQLite (embedded default)",
        "storage": "local folder",
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"items={view.total_items} chunks={chunks} sources={args.sources} poses={poses_needed}")
    if cli is not None:
        print(f"cli_process_s={cli:.3f} (python start-up, imports and submit, --detach)")
    print(f"submit_latency_s={in_process:.4f}")


if __name__ == "__main__":
    main()
