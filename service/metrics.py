"""The Prometheus metric catalogue (DESIGN §7): prefix `dpig_`, base units, bounded labels, never a
job id in a label. Workers run under Celery prefork, so they use prometheus_client's multiprocess
mode (PROMETHEUS_MULTIPROC_DIR); the API and the dispatcher are single processes."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

# The worker image and its Kubernetes config set PROMETHEUS_MULTIPROC_DIR for `dpig worker`, which
# makes the folder at start (cli/worker.py); any other dpig command run there (an embedded
# `dpig submit`, `dpig keys create`) would fail on the first metric in a folder that is not there.
if _multiproc_dir := os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.makedirs(_multiproc_dir, exist_ok=True)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
SECONDS_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
STAGES = ("load", "encode", "infer", "decode", "upload")

IMAGES_GENERATED = Counter("dpig_images_generated_total", "Images written to job outputs.")
ITEMS_FAILED = Counter("dpig_items_failed_total", "Items that could not be made.", ["reason"])
BATCH_SIZE = Histogram("dpig_batch_size", "Real rows per micro-batch.", buckets=BATCH_BUCKETS)
BATCH_DURATION = Histogram(
    "dpig_batch_duration_seconds", "Time per micro-batch.", buckets=SECONDS_BUCKETS
)
CHUNK_DURATION = Histogram(
    "dpig_chunk_duration_seconds", "Time to run and commit one chunk.", buckets=SECONDS_BUCKETS
)
QUEUE_WAIT = Histogram(
    "dpig_queue_wait_seconds",
    "From a chunk's publication to a worker starting it.",
    buckets=SECONDS_BUCKETS,
)
STAGE_SECONDS = Counter("dpig_stage_seconds_total", "Worker time by stage.", ["stage"])
CHUNK_ATTEMPTS = Counter("dpig_chunk_attempts_total", "Chunk attempts by outcome.", ["outcome"])
MODEL_LOAD = Histogram(
    "dpig_model_load_seconds", "Time to load a model into a worker.", buckets=SECONDS_BUCKETS
)
# From the database (the dispatcher sets them): the autoscaling signal and the job census.
OUTSTANDING = Gauge(
    "dpig_work_items_outstanding",
    "Items in chunks not yet finished.",
    ["queue", "state"],
    multiprocess_mode="livemax",
)
JOBS = Gauge("dpig_jobs", "Jobs by state.", ["state"], multiprocess_mode="livemax")
JOBS_EXPIRED = Counter("dpig_jobs_expired_total", "Jobs stopped at their expires_at.")
JOBS_DELETED = Counter("dpig_jobs_deleted_total", "Jobs whose outputs retention deleted.")
WEBHOOK_ATTEMPTS = Counter(
    "dpig_webhook_attempts_total", "Webhook delivery attempts by result.", ["result"]
)

FAILURE_REASONS = ("bad_input", "no_person", "error")
OUTCOMES = ("committed", "failed", "lost_lease", "stopped", "expired", "dead")
WEBHOOK_RESULTS = ("delivered", "retry", "failed")


def failure_reason(message: str) -> str:
    """A bounded label for an item error message."""
    text = message.lower()
    if "no person" in text or "no keypoints" in text:
        return "no_person"
    if "unreadable" in text or "not found" in text or "no such" in text:
        return "bad_input"
    return "error"


def touch_labels() -> None:
    """Create every labelled series at zero, so dashboards and rate() see them from the start."""
    for reason in FAILURE_REASONS:
        ITEMS_FAILED.labels(reason)
    for stage in STAGES:
        STAGE_SECONDS.labels(stage)
    for outcome in OUTCOMES:
        CHUNK_ATTEMPTS.labels(outcome)
    for result in WEBHOOK_RESULTS:
        WEBHOOK_ATTEMPTS.labels(result)


def exposition() -> tuple[bytes, str]:
    """The metrics page: every process's samples in multiprocess mode, else this process's."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST
