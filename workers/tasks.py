"""Thin Celery tasks: a chunk id in, the chunk executor called (DESIGN §2).

The model is loaded lazily in the worker child process, never in the parent: prefork after torch
has run in the parent deadlocks (env-notes). A SIGTERM to the worker (Kubernetes scale-down, a
deploy) writes a stop file; the running chunk sees it between micro-batches and hands its lease
back, so another worker takes the chunk over at once instead of after the lease expires.

Probes for Kubernetes and compose (each off unless its variable is set), started in every child:
- ``DPIG_WORKER_HEARTBEAT_FILE``: a thread touches it every ``DPIG_WORKER_HEARTBEAT_S`` seconds
  (default 10); the liveness probe checks its age.
- ``DPIG_WORKER_READY_FILE``: written once the child can take work; with ``DPIG_PRELOAD_MODEL=1``
  only after the default model has loaded (in a thread, so the child reports to its parent in
  time: Celery replaces a child that takes longer than a few seconds to start). The readiness
  probe checks that it exists; the parent removes it when the worker shuts down.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init, worker_shutting_down

from service import metrics
from service.chunks import note_received
from service.db import utcnow
from service.errors import tenant_reason
from service.jobs import (
    Context,
    claim_chunk,
    job_state,
    maybe_finalize,
    open_context,
    release_chunk,
    resolve_model,
)
from service.settings import get_settings
from workers.celery_app import app

log = logging.getLogger(__name__)
STOP_FILE = Path(
    os.environ.get(
        "DPIG_WORKER_STOP_FILE", Path(tempfile.gettempdir()) / f"dpig-worker-{os.getpid()}.stop"
    )
)
_state: dict[str, Any] = {}
_state_lock = threading.Lock()  # the preload thread and the first task may both initialise
_probes_stop = threading.Event()


def _worker() -> tuple[Context, Any]:
    with _state_lock:
        return _init_worker()


def _init_worker() -> tuple[Context, Any]:
    if "ctx" not in _state:
        import torch

        from service.executor import PipelineCache

        torch.set_num_threads(int(os.environ.get("DPIG_TORCH_THREADS", "1")))
        device = os.environ.get("DPIG_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
        batch = int(os.environ.get("DPIG_BATCH_SIZE", "256" if device == "cuda" else "32"))
        options: dict[str, Any] = {}
        if os.environ.get("DPIG_PRECISION"):
            options["precision"] = os.environ["DPIG_PRECISION"]
        _state["ctx"] = open_context(get_settings(), migrate=False)
        _state["pipes"] = PipelineCache(device=device, batch_size=batch, **options)
        _state["owner"] = f"{socket.gethostname()}-{os.getpid()}"
    return _state["ctx"], _state["pipes"]


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


def _heartbeat(path: Path, every_s: float) -> None:
    """Touch `path` every `every_s` seconds until `_probes_stop` is set (liveness)."""
    while True:
        try:
            _touch(path)
        except OSError as exc:
            log.warning("heartbeat %s: %s", path, exc)
        if _probes_stop.wait(every_s):
            return


def _preload_and_mark_ready(ready: Path | None) -> None:
    """With DPIG_PRELOAD_MODEL=1 load the default model now; then write the ready file. A failed
    load leaves the worker unready (and the first chunk retries the load and reports the error)."""
    try:
        if os.environ.get("DPIG_PRELOAD_MODEL", "").lower() in ("1", "true", "yes"):
            ctx, pipes = _worker()
            pipes.get(ctx, "default", resolve_model(ctx, "default").weights_sha256)
            log.info("default model loaded")
        if ready is not None:
            _touch(ready)
    except Exception:  # noqa: BLE001 - a thread must not die silently
        log.exception("preloading the default model failed; this worker stays unready")


def start_probes() -> list[threading.Thread]:
    """The heartbeat and ready-file threads this child's environment asks for."""
    threads: list[threading.Thread] = []
    if heartbeat := os.environ.get("DPIG_WORKER_HEARTBEAT_FILE"):
        every = float(os.environ.get("DPIG_WORKER_HEARTBEAT_S", "10"))
        threads.append(threading.Thread(target=_heartbeat, args=(Path(heartbeat), every)))
    ready = os.environ.get("DPIG_WORKER_READY_FILE")
    if ready or os.environ.get("DPIG_PRELOAD_MODEL"):
        path = Path(ready) if ready else None
        threads.append(threading.Thread(target=_preload_and_mark_ready, args=(path,)))
    for thread in threads:
        thread.daemon = True
        thread.start()
    return threads


@worker_process_init.connect
def _child_started(**_: Any) -> None:
    metrics.touch_labels()
    start_probes()


@worker_shutting_down.connect
def _shutting_down(**_: Any) -> None:
    STOP_FILE.touch()
    if ready := os.environ.get("DPIG_WORKER_READY_FILE"):
        Path(ready).unlink(missing_ok=True)


@app.task(name="dpig.run_chunk", acks_late=True, reject_on_worker_lost=True)
def run_chunk(chunk_id: int) -> str:
    """Record the message's receipt (so the dispatcher never re-sends it as lost), lease the
    chunk (a duplicate or stale message finds nothing to lease and returns), run it, and finalise
    its job if it was the last one."""
    from service.executor import execute_chunk

    ctx, pipes = _worker()
    note_received(ctx, chunk_id)
    claim = claim_chunk(ctx, _state["owner"], chunk_id=chunk_id)
    if claim is None:
        return "skipped"
    if claim.published_at is not None:
        metrics.QUEUE_WAIT.observe(max(0.0, (utcnow() - claim.published_at).total_seconds()))

    def should_stop() -> bool:
        return STOP_FILE.exists() or job_state(ctx, claim.job_id) in ("paused", "cancelling")

    try:
        outcome = execute_chunk(ctx, claim, pipes, should_stop=should_stop)
    except SoftTimeLimitExceeded:
        release_chunk(ctx, claim, error="chunk exceeded the soft time limit")
        metrics.CHUNK_ATTEMPTS.labels("failed").inc()
        return "failed"
    except Exception as exc:  # noqa: BLE001 - recorded on the chunk; the dispatcher retries it
        log.warning("chunk %d failed", chunk_id, exc_info=True)
        release_chunk(ctx, claim, error=tenant_reason(exc))
        metrics.CHUNK_ATTEMPTS.labels("failed").inc()
        return "failed"
    maybe_finalize(ctx, claim.job_id)
    return outcome.state
