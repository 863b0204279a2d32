"""The Celery application: Redis carries chunk ids, PostgreSQL holds the truth (DESIGN §3).

Settings that make a lost worker lose nothing (service-notes §2): late acknowledgement with
reject-on-worker-lost (a SIGKILLed worker's message goes back to the queue), prefetch 1 (a worker
never sits on messages it is not running), a visibility timeout far above the longest chunk, and
soft/hard time limits. Results are not stored: a chunk's outcome is in the database.
"""

from __future__ import annotations

import os

from celery import Celery
from kombu.entity import Queue

from service.settings import get_settings

QUEUES = ("interactive", "bulk")
CHUNK_SOFT_LIMIT_S = int(os.environ.get("DPIG_CHUNK_SOFT_LIMIT_S", "1800"))
CHUNK_HARD_LIMIT_S = CHUNK_SOFT_LIMIT_S + 120


def make_app(broker_url: str | None = None) -> Celery:
    url = broker_url or get_settings().broker_url or "redis://127.0.0.1:6379/0"
    app = Celery("dpig", broker=url, include=["workers.tasks"])
    app.conf.update(
        task_queues=[Queue(name) for name in QUEUES],
        task_default_queue="bulk",
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_ignore_result=True,
        task_soft_time_limit=CHUNK_SOFT_LIMIT_S,
        task_time_limit=CHUNK_HARD_LIMIT_S,
        worker_prefetch_multiplier=1,
        worker_send_task_events=False,
        broker_connection_retry_on_startup=True,
        broker_transport_options={
            # far above the longest chunk, or Redis redelivers a chunk that is still running
            "visibility_timeout": 4 * CHUNK_HARD_LIMIT_S,
            "socket_timeout": 10,
            "socket_connect_timeout": 10,
        },
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
    return app


app = make_app()
