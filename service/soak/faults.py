"""The soak's faults, injected at random into a LocalStack while its jobs run.

Each fault is a small state machine: `begin` does the damage, `advance` is called on every turn
of the soak's loop and says when the fault is over (a stopped process started again, a frozen
worker thawed), and `heal` ends it at once when the soak stops. A fault names the processes it
touches, so two faults never act on the same process at once."""

from __future__ import annotations

import logging
import os
import random
import signal
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import text

from service.localstack import STANDBY_DISPATCHER, LocalStack

log = logging.getLogger("dpig.soak")


@dataclass
class Fault:
    """One fault in progress. `busy` holds the process names it acts on."""

    stack: LocalStack
    rng: random.Random
    engine: Any  # the stack's database, for faults that look at the chunks
    busy: set[str] = field(default_factory=set)
    started: float = field(default_factory=time.monotonic)
    outcomes: Counter[str] = field(default_factory=Counter)

    name = "fault"

    def begin(self, free: list[str]) -> bool:
        """Do the damage on processes of `free`; False when there is nothing to act on now."""
        raise NotImplementedError

    def advance(self) -> bool:
        """True when the fault is over."""
        return True

    def heal(self) -> None:
        """End the fault now."""

    def _after(self, seconds: float) -> bool:
        return time.monotonic() - self.started >= seconds


class _Outage(Fault):
    """A process stopped (or SIGKILLed) for a few seconds, then started again."""

    process = ""
    kill = False
    down_s = (1.0, 3.0)

    def _target(self, free: list[str]) -> str | None:
        return self.process if self.process in free else None

    def begin(self, free: list[str]) -> bool:
        target = self._target(free)
        if target is None:
            return False
        self.process = target
        self.busy = {target}
        self.down_for = self.rng.uniform(*self.down_s)
        if self.kill:
            self.stack.kill(self.process)
        else:
            self.stack.stop(self.process, timeout=5)
        return True

    def advance(self) -> bool:
        if not self._after(self.down_for):
            return False
        self.heal()
        return True

    def heal(self) -> None:
        if not self.stack.running(self.process):
            self.stack.start(self.process)


class KillApi(_Outage):
    name, process, kill = "api_kill", "api", True


class KillDispatcher(_Outage):
    name, process, kill = "dispatcher_kill", "dispatcher", True


class RestartRedis(_Outage):
    name, process = "redis_restart", "redis"


class S3Outage(_Outage):
    name, process, down_s = "s3_outage", "seaweedfs", (3.0, 8.0)


class RestartPostgres(_Outage):
    name, process = "postgres_restart", "postgres"

    def begin(self, free: list[str]) -> bool:
        return self.stack.private_postgres and super().begin(free)


class FlushRedis(Fault):
    """Every message in the broker is lost at once."""

    name = "redis_flushall"

    def begin(self, free: list[str]) -> bool:
        if "redis" not in free:
            return False
        self.stack.redis().flushall()
        return True


class KillWorker(_Outage):
    """SIGKILL of a worker's parent and its children (a node lost), restarted after a while."""

    name, kill, down_s = "worker_kill", True, (0.0, 3.0)

    def _target(self, free: list[str]) -> str | None:
        workers = [w for w in self.stack.worker_names if w in free and self.stack.running(w)]
        return self.rng.choice(workers) if workers else None


class KillWorkerChild(Fault):
    """SIGKILL of a worker's prefork child only (an OOM kill): Celery starts a new child."""

    name = "worker_child_kill"

    def begin(self, free: list[str]) -> bool:
        workers = [w for w in self.stack.worker_names if w in free and self.stack.children(w)]
        if not workers:
            return False
        worker = self.rng.choice(workers)
        parent = self.stack.pids[worker]
        children = [p for p in self.stack.children(worker) if _parent(p) == parent]
        if not children:
            return False
        os.kill(self.rng.choice(children), signal.SIGKILL)
        return True


class StallWorker(Fault):
    """SIGSTOP of a worker (parent and children) holding a chunk's lease, past the lease, until
    another worker has run that chunk again (or its job was paused, cancelled or finished); then
    SIGCONT, so the stale attempt wakes up and tries to finish its uploads and its commit (they
    must change nothing)."""

    name = "worker_stall"
    give_up_s = 90.0
    pids: list[int]
    chunk: dict[str, Any]

    def begin(self, free: list[str]) -> bool:
        held = self._held()
        for worker in self.rng.sample(self.stack.worker_names, len(self.stack.worker_names)):
            owners = {f"{socket.gethostname()}-{p}" for p in self.stack.children(worker)}
            chunks = [c for c in held if c["lease_owner"] in owners]
            if worker in free and chunks:
                self.busy = {worker}
                self.chunk = chunks[0]
                self.pids = self.stack.freeze(worker)
                return True
        return False

    def advance(self) -> bool:
        if not self._after(self.give_up_s):
            with self.engine.connect() as conn:
                row = conn.execute(
                    text(
                        "SELECT c.state, c.lease_token, j.state AS job_state FROM chunks c "
                        "JOIN jobs j ON j.id = c.job_id WHERE c.id = :id"
                    ),
                    {"id": self.chunk["id"]},
                ).one()
            rerun = row.state == "done" and row.lease_token != self.chunk["lease_token"]
            if not rerun and row.job_state in ("queued", "running"):
                return False
            # else the job was paused, cancelled or finished meanwhile
            self.outcomes["stall_rerun" if rerun else f"stall_job_{row.job_state}"] += 1
        else:
            log.warning("stalled chunk %s was not re-run in %g s", self.chunk, self.give_up_s)
            self.outcomes["stall_gave_up"] += 1
        self.heal()
        return True

    def heal(self) -> None:
        self.stack.thaw(self.pids)

    def _held(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                text("SELECT id, lease_owner, lease_token FROM chunks WHERE state = 'running'")
            ).mappings()
            return [dict(r) for r in rows]


class SecondDispatcher(Fault):
    """A second dispatcher starts beside the first (it stands by on the advisory lock); the
    first is killed, so the second takes over; the first comes back (standing by); then the
    second stops and the first takes over again."""

    name = "second_dispatcher"

    def begin(self, free: list[str]) -> bool:
        if "dispatcher" not in free:
            return False
        self.busy = {"dispatcher", STANDBY_DISPATCHER}
        self.stack.start(STANDBY_DISPATCHER)
        self.step = 0
        self.next_at = self.rng.uniform(2.0, 6.0)
        return True

    def advance(self) -> bool:
        if not self._after(self.next_at):
            return False
        self.step += 1
        self.next_at += self.rng.uniform(2.0, 6.0)
        if self.step == 1:
            self.stack.kill("dispatcher")
        elif self.step == 2:
            self.stack.start("dispatcher")
        else:
            self.heal()
            return True
        return False

    def heal(self) -> None:
        if not self.stack.running("dispatcher"):
            self.stack.start("dispatcher")
        if self.stack.running(STANDBY_DISPATCHER):
            self.stack.stop(STANDBY_DISPATCHER)


FAULTS: list[type[Fault]] = [
    KillWorkerChild,
    KillWorker,
    StallWorker,
    SecondDispatcher,
    KillDispatcher,
    KillApi,
    FlushRedis,
    RestartRedis,
    S3Outage,
    RestartPostgres,
]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1
