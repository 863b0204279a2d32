"""A poison chunk: a source image that crashes the worker process every time it is read is
dead-lettered after max attempts, with its error; the rest of the job completes."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SOURCES = 6
POSES = 8  # = the chunk size: one chunk per source image
POISON = 3  # the fourth source (sorted) is the poisoned one
MAX_ATTEMPTS = 2


@pytest.fixture(scope="module")
def grid(e2e: Any, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """CLI arguments of a pose-grid job (6 sources in the bucket × 8 poses, chunks of 8) whose
    fourth source has 'poison' in its name."""
    from dpig_core.data.pose_files import write_pose_file
    from dpig_core.data.readers import read_dataset
    from dpig_core.data.synth import write_market_dataset
    from service.localstack import BUCKET

    root = tmp_path_factory.mktemp("poison")
    write_market_dataset(root / "market", identities=4, per_identity=4, height=64, width=32,
                         seed=5, progress=False)  # fmt: skip
    records = sorted(
        (r for r in read_dataset(root / "market").records if r.rcv is not None),
        key=lambda r: r.path,
    )
    assert len(records) >= max(SOURCES, POSES)
    prefix = f"sources/{uuid.uuid4().hex[:8]}/"
    keypoints = []
    for k, record in enumerate(records[:SOURCES]):
        name = f"person-{k}{'-poison' if k == POISON else ''}{record.path.suffix}"
        e2e.s3.put_object(Bucket=BUCKET, Key=prefix + name, Body=record.path.read_bytes())
        keypoints.append((name, record.rcv))
    write_pose_file(root / "keypoints.json", keypoints, 64, 32)
    poses = [(f"pose-{k}", r.rcv) for k, r in enumerate(records[-POSES:])]
    write_pose_file(root / "poses.json", poses, 64, 32)
    return [
        "--pose-grid", str(root / "poses.json"),
        "--images", f"s3://{BUCKET}/{prefix}",
        "--keypoints", str(root / "keypoints.json"),
        "--chunk-size", str(POSES),
        "--seed", "3",
    ]  # fmt: skip


def _with_tests_dir() -> str:
    """PYTHONPATH with this folder (for poison_preload) in front of whatever the run has, so
    the poisoned workers still import the code under test (not an installed copy)."""
    return os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")]))


def test_poison_chunk_is_dead_lettered(stack: Any, e2e: Any, grid: list[str]) -> None:
    # the undisturbed run, by the ordinary workers: every item, poisoned name or not
    ref_job = e2e.submit(*grid)
    e2e.wait_job(ref_job["id"], ("completed", "failed", "cancelled"))
    ref_rows = e2e.manifest(ref_job["id"])
    total = SOURCES * POSES
    assert [r["item"] for r in ref_rows] == list(range(total))
    reference = {int(r["item"]): str(r["sha256"]) for r in ref_rows}

    preload = [sys.executable, "-c", "import poison_preload; from cli.main import app; app()"]
    try:
        stack.restart("dispatcher", env={"DPIG_MAX_ATTEMPTS": str(MAX_ATTEMPTS)})
        stack.restart_workers(
            env={"PYTHONPATH": _with_tests_dir(), "DPIG_MAX_ATTEMPTS": str(MAX_ATTEMPTS)},
            command=preload,
        )
        job = e2e.submit(*grid)
        e2e.wait_job(job["id"], ("completed", "failed", "cancelled"))
        final = e2e.dpig("status", job["id"])
        chunks = e2e.chunks(job["id"])
        # the workers survived: Celery replaced the dead child each time
        assert all(stack.running(w) for w in stack.worker_names)
    finally:
        stack.restart("dispatcher")
        stack.restart_workers()

    assert final["state"] == "completed", final
    assert (final["done_items"], final["failed_items"]) == (total - POSES, POSES)
    dead = [c for c in chunks if c["state"] == "dead"]
    assert [c["index"] for c in dead] == [POISON]
    assert dead[0]["attempts"] == MAX_ATTEMPTS
    assert "expired" in dead[0]["last_error"], dead[0]
    assert all(c["state"] == "done" for c in chunks if c["index"] != POISON)

    poisoned = range(POISON * POSES, (POISON + 1) * POSES)
    e2e.check_exact(job["id"], reference, [i for i in range(total) if i not in poisoned])
    errors = [json.loads(line) for line in e2e.get(job["id"], "errors.jsonl").splitlines()]
    assert errors == [{"chunk": POISON, "error": dead[0]["last_error"]}]
