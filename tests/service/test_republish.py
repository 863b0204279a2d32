"""Finding 5 of issue 17: a chunk that merely waits in the queue behind slow workers is never
re-sent as lost, while a message that was really lost (a Redis flush) still is.

A deterministic simulation on SQLite: the recorded messages form the FIFO queue, one worker slot
takes the head message (receipt, then claim) and holds the chunk for `rounds` ticks, and time
passes by moving every chunk timestamp 60 s into the past between ticks.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from service.chunks import note_received
from service.db import Chunk
from service.dispatch import DispatchConfig, tick
from service.jobs import Claim, Context, claim_chunk, commit_chunk, open_context, submit, tenant_id
from service.settings import Settings
from service.specs import parse_spec

STEP = timedelta(seconds=60)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[Context]:
    settings = Settings.from_values(
        home=tmp_path / "home",
        database_url=f"sqlite:///{tmp_path / 'dpig.db'}",
        storage_url=(tmp_path / "outputs").as_uri(),
        lease_seconds=3600,
    )
    context = open_context(settings, embedded=False)
    yield context
    context.sessions.kw["bind"].dispose()


def _age(ctx: Context) -> None:
    """A minute passes: every recorded time moves 60 s into the past."""
    with ctx.session() as session:
        for chunk in session.scalars(select(Chunk)):
            for name in ("published_at", "received_at", "started_at", "finished_at"):
                if (value := getattr(chunk, name)) is not None:
                    setattr(chunk, name, value - STEP)


def _run(ctx: Context, *, chunks: int, bound: int, rounds: int, flush_at: int = -1) -> int:
    """Messages sent until every chunk is done, with one worker slot that takes `rounds` minutes
    per chunk; at round `flush_at` the broker loses every queued message."""
    spec = parse_spec({"kind": "sample", "count": chunks, "chunk_size": 1, "queue": "bulk"})
    submit(ctx, tenant_id(ctx, "acme"), spec)
    config = DispatchConfig(
        max_in_flight={"interactive": 1, "bulk": bound},
        republish_after_s=120,
        finalize_in_tick=False,
    )
    queue: list[int] = []
    sent = done = 0
    running: tuple[Claim, int] | None = None

    def publish(chunk_id: int, _queue: str) -> None:
        nonlocal sent
        queue.append(chunk_id)
        sent += 1

    for now in range(10 * chunks * rounds):
        tick(ctx, publish, config)
        if now == flush_at:
            queue.clear()
        if running is not None and now - running[1] >= rounds:
            assert commit_chunk(ctx, running[0], done=1, failed=0)
            running, done = None, done + 1
        while running is None and queue:
            chunk_id = queue.pop(0)
            note_received(ctx, chunk_id)
            claim = claim_chunk(ctx, "slow-worker", chunk_id=chunk_id)
            if claim is not None:
                running = (claim, now)
        if done == chunks:
            return sent
        _age(ctx)
    raise AssertionError(f"{done} of {chunks} chunks done after {sent} messages")


def test_a_backlog_behind_a_slow_worker_is_not_re_sent(ctx: Context) -> None:
    # the issue measured 19 messages for 4 chunks (compose's bound of 8, chunks slower than the
    # re-publish delay)
    assert _run(ctx, chunks=4, bound=8, rounds=3) == 4


def test_a_bound_of_two_sends_one_message_per_chunk(ctx: Context) -> None:
    assert _run(ctx, chunks=50, bound=2, rounds=3) == 50


def test_messages_lost_in_a_broker_flush_are_re_sent_once_the_queue_stalls(ctx: Context) -> None:
    # at round 1 chunk 0 runs and chunks 1-3 wait; the flush loses those three messages, which
    # go out again once the queue has shown no life for the re-publish delay
    assert _run(ctx, chunks=4, bound=4, rounds=2, flush_at=1) == 7
