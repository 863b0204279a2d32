"""`dpig worker` and `dpig dispatcher`: Celery on Redis, with PostgreSQL as the source of truth."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import typer

from cli.errors import fail


def _multiprocess_dir() -> Path:
    """prometheus_client's multiprocess mode needs its folder before the library is imported."""
    folder = Path(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or
                  Path(tempfile.gettempdir()) / f"dpig-metrics-{os.getpid()}")  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)  # stale files of a previous run would add up
    folder.mkdir(parents=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    return folder


def worker(
    queues: str = typer.Option("interactive,bulk", help="Queues to consume, comma-separated."),
    concurrency: int = typer.Option(1, min=1, help="Child processes (one per GPU)."),
    metrics_port: int = typer.Option(9101, help="Port of /metrics (0: none)."),
    loglevel: str = typer.Option("info", help="Celery log level."),
    name: str = typer.Option("dpig@%h", help="Worker node name."),
) -> None:
    """Run chunks from the queues: prefork children, each loading the model once (lazily, in the
    child), prefetch 1, late acks; SIGTERM hands the running chunk's lease back and exits."""
    folder = _multiprocess_dir()
    os.environ.setdefault("DPIG_WORKER_STOP_FILE", str(folder / "stop"))
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    if metrics_port:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        start_http_server(metrics_port, registry=registry)
    from workers.celery_app import QUEUES, app

    unknown = set(queues.split(",")) - set(QUEUES)
    if unknown:
        fail(f"--queues: unknown {sorted(unknown)}; expected some of {list(QUEUES)}")
    Path(os.environ["DPIG_WORKER_STOP_FILE"]).unlink(missing_ok=True)
    app.worker_main([
        "worker", "-Q", queues, "--pool", "prefork", "--concurrency", str(concurrency),
        "--prefetch-multiplier", "1", "--loglevel", loglevel, "-n", name,
        "--without-gossip", "--without-mingle",
    ])  # fmt: skip


def dispatcher(
    interval: float = typer.Option(1.0, min=0.05, help="Seconds between ticks."),
    max_in_flight: str = typer.Option(
        "interactive=4,bulk=8", help="Chunks published or running per queue."
    ),
    republish_after: float = typer.Option(
        120.0, min=1, help="Re-publish a pending chunk whose message is this old (lost message)."
    ),
    retry_backoff: float = typer.Option(
        2.0,
        min=0,
        help="Seconds before a failed chunk is published again, doubling per attempt (at most "
        "5 minutes); 0: at once.",
    ),
    metrics_port: int = typer.Option(9102, help="Port of /metrics (0: none)."),
) -> None:
    """Publish runnable chunks just in time, re-queue expired leases, re-publish lost messages,
    finalise finished jobs, and export the outstanding-work gauges (the autoscaling signal)."""
    from prometheus_client import start_http_server

    from service import metrics
    from service.dispatch import DispatchConfig, housekeep, tick
    from service.dispatch_lock import DispatcherLock
    from service.jobs import open_context
    from service.settings import get_settings
    from workers.celery_app import app

    try:
        bounds = {q: int(n) for q, n in (part.split("=") for part in max_in_flight.split(","))}
    except ValueError:
        fail(f"--max-in-flight: expected queue=N,queue=N, got {max_in_flight!r}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    log = logging.getLogger("dpig.dispatcher")
    if metrics_port:
        start_http_server(metrics_port)
    metrics.touch_labels()
    config = DispatchConfig(
        max_in_flight=bounds,
        republish_after_s=republish_after,
        retry_backoff_s=retry_backoff,
        gauges_every_s=1.0,
        finalize_in_tick=False,
    )
    stopping = {"now": False}

    def stop(*_: Any) -> None:
        stopping["now"] = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)

    def publish(chunk_id: int, queue: str) -> None:
        app.send_task("dpig.run_chunk", args=[chunk_id], queue=queue)

    ctx = None
    lock = DispatcherLock(get_settings().database_url)
    standing_by = False

    def finalise_forever() -> None:
        """Finalisation and retention deletes take minutes on a large job: beside the ticks,
        not inside."""
        fctx = None
        while not stopping["now"]:
            try:
                if lock.held:
                    fctx = fctx or open_context(get_settings(), migrate=False)
                    if finalized := housekeep(fctx):
                        log.info("finalised %d jobs", finalized)
            except Exception as exc:  # noqa: BLE001 - an outage: try again
                log.warning("finalising failed: %s", exc)
            time.sleep(interval)

    threading.Thread(target=finalise_forever, name="finaliser", daemon=True).start()
    while not stopping["now"]:
        started = time.monotonic()
        try:
            if not lock.acquire():  # another dispatcher is active: only one may tick
                if not standing_by:
                    log.info("another dispatcher holds the lock; standing by")
                standing_by = True
                time.sleep(interval)
                continue
            standing_by = False
            ctx = ctx or open_context(get_settings(), migrate=False)
            report = tick(ctx, publish, config)
            if report.expired or report.republished or any(report.published.values()):
                log.info("tick: %s", report)
        except Exception as exc:  # noqa: BLE001 - a database or broker outage: retry next tick
            log.warning("tick failed: %s", exc)
        time.sleep(max(0.0, interval - (time.monotonic() - started)))
    lock.release()
