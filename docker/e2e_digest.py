"""Run inside a dpig image by docker/compose_e2e.py: the sha256 of every image of a job.

    python e2e_digest.py DIR    # DIR: what `dpig download JOB DIR` wrote

Prints one JSON object {item key: sha256 of its PNG}, read from the tar shards' bytes, after
checking that manifest.parquet lists each of them once, with status ok and the same sha256.
"""

from __future__ import annotations

import hashlib
import json
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq


def digest(folder: Path) -> dict[str, str]:
    images: dict[str, str] = {}
    for shard in sorted(folder.glob("shards/*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if not member.name.endswith(".png"):
                    continue
                handle = tar.extractfile(member)
                assert handle is not None, member.name
                key = member.name.removesuffix(".png")
                if key in images:
                    raise SystemExit(f"item {key} appears in two shards")
                images[key] = hashlib.sha256(handle.read()).hexdigest()
    rows = pq.read_table(folder / "manifest.parquet").to_pylist()
    listed = {str(r["key"]): str(r["sha256"]) for r in rows if r["status"] == "ok"}
    if len(rows) != len(listed) or listed != images:
        raise SystemExit(f"manifest ({len(rows)} rows) and shards ({len(images)}) disagree")
    return images


if __name__ == "__main__":
    print(json.dumps(digest(Path(sys.argv[1])), sort_keys=True))  # noqa: T201
