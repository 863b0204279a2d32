"""Cancel and pause/resume through the CLI while workers run the job (DESIGN §3)."""

from __future__ import annotations

import time
from typing import Any

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_cancel_mid_job(e2e: Any, reference: dict[int, str]) -> None:
    """The job reads cancelled within seconds; finished shards are kept and the manifest (valid
    Parquet) lists exactly the committed shards' items, byte-identical to the reference."""
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    asked = time.monotonic()
    view = e2e.dpig("cancel", job["id"])
    assert view["state"] in ("cancelling", "cancelled"), view
    e2e.wait_job(job["id"], ("cancelled",), timeout=10)
    assert time.monotonic() - asked < 10

    final = e2e.dpig("status", job["id"])
    chunks = e2e.chunks(job["id"])
    done = [c for c in chunks if c["state"] == "done"]
    assert 0 < len(done) < len(chunks), "cancel came too late to stop anything"
    assert not [c for c in chunks if c["state"] == "running"]
    items = [i for c in done for i in range(c["item_start"], c["item_stop"])]
    assert final["state"] == "cancelled"
    assert final["done_items"] == len(items)
    e2e.check_exact(job["id"], reference, items)
    keys = e2e.keys(job["id"])
    assert "_CANCELLED" in keys and "_SUCCESS" not in keys
    committed = sorted(k.split("-")[0] for k in keys if k.endswith(".done.json"))
    assert committed == [f"shards/{c['index']:06d}" for c in done]


def test_pause_then_resume(e2e: Any, reference: dict[int, str]) -> None:
    """Pause: running chunks stop at their next micro-batch and nothing new starts. Resume: the
    job continues where it stopped and completes, exact and byte-identical."""
    job = e2e.submit(*e2e.sample_args)
    e2e.wait_progress(job["id"])
    view = e2e.dpig("pause", job["id"])
    assert view["state"] == "paused", view

    def settled() -> bool:
        return not [c for c in e2e.chunks(job["id"]) if c["state"] == "running"]

    e2e.wait_for("running chunks to stop", settled, timeout=10)
    paused = e2e.dpig("status", job["id"])
    time.sleep(2)
    later = e2e.dpig("status", job["id"])
    assert later["state"] == "paused"
    assert later["done_items"] == paused["done_items"] < paused["total_items"]

    # an attached resume follows the job until it settles, and exits 0 for a clean completion
    assert e2e.dpig("resume", job["id"], timeout=90)["state"] == "completed"
    e2e.check_completed(job["id"], reference)
