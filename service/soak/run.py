"""The chaos soak: tenants drive jobs of every kind through the HTTP API of a LocalStack while
faults hit it at random; then the stack is healed, the jobs drain, and every job is checked
against an undisturbed reference run of its spec (service/soak/check.py).

    python bench/soak.py --minutes 30        # the long form, on a stack of its own
    pytest tests/e2e/test_soak.py            # about 3 minutes of faults, in CI

The last line printed is the summary, e.g.
`soak seconds=180 faults=31 (...) jobs=24 items=812 ... stuck=0 mismatches=0`.
"""

from __future__ import annotations

import logging
import random
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from service.localstack import STANDBY_DISPATCHER, LocalStack
from service.soak.check import FINAL, Bucket, Verdict, check_job, soak_jobs
from service.soak.faults import FAULTS, Fault
from service.soak.workload import Tenant, Tenants, menu, upload_sources

log = logging.getLogger("dpig.soak")


@dataclass
class SoakConfig:
    seconds: float = 180.0  # of faults; the references come before, the drain after
    seed: int = 0
    tenants: int = 3
    max_active: int = 6
    fault_gap_s: tuple[float, float] = (2.0, 8.0)
    action_gap_s: tuple[float, float] = (0.3, 1.5)
    max_faults_at_once: int = 2
    drain_timeout_s: float = 600.0


@dataclass
class Summary:
    seconds: float
    faults: Counter[str]
    actions: Counter[str]
    refused: Counter[str]  # tenant calls that failed (an outage) or were refused (a 409)
    verdict: Verdict
    outcomes: Counter[str] = field(default_factory=Counter)  # e.g. how stalls ended

    @property
    def ok(self) -> bool:
        return self.verdict.mismatches == 0 and self.verdict.stuck == 0

    def line(self) -> str:
        v = self.verdict
        faults = ",".join(f"{k}={n}" for k, n in sorted(self.faults.items()))
        actions = ",".join(f"{k}={n}" for k, n in sorted(self.actions.items()))
        outcomes = ",".join(f"{k}={n}" for k, n in sorted(self.outcomes.items()))
        states = ",".join(f"{k}={n}" for k, n in sorted(v.states.items()))
        return (
            f"soak seconds={self.seconds:.0f} faults={sum(self.faults.values())} ({faults}) "
            f"outcomes=({outcomes}) actions=({actions}) "
            f"refused={sum(self.refused.values())} jobs={v.jobs} ({states}) items={v.items} "
            f"failed_items={v.failed_items} dead_chunks={sum(v.dead_chunks.values())} "
            f"stuck={v.stuck} "
            f"mismatches={v.mismatches}"
        )


def _client(stack: LocalStack, key: str) -> Any:
    from dpig.client import Client

    return Client(stack.api_url, key, timeout=10.0)


def _references(
    tenant: Tenant, specs: dict[int, dict[str, Any]], bucket: Bucket
) -> dict[int, dict[int, str]]:
    """seed → item → sha256, from one undisturbed run of every spec (each complete)."""
    import io

    import pyarrow.parquet as pq

    ids = {seed: tenant.client.submit(spec).id for seed, spec in specs.items()}
    references: dict[int, dict[int, str]] = {}
    for seed, job_id in ids.items():
        job = tenant.client.wait(job_id, timeout=600)
        if job.state != "completed" or job.failed_items or job.done_items != job.total_items:
            raise RuntimeError(f"the reference run of seed {seed} ended {job}")
        body = bucket.get(job_id, "manifest.parquet")
        assert body is not None
        rows = pq.read_table(io.BytesIO(body)).to_pylist()
        references[seed] = {int(r["item"]): str(r["sha256"]) for r in rows}
    return references


def _safely(call: Any, default: Any) -> Any:
    """The soak's own calls ride out the outages it causes (PostgreSQL restarting)."""
    try:
        return call()
    except Exception as exc:  # noqa: BLE001 - asked again on the next turn
        log.warning("soak: %s", exc)
        return default


class Chaos:
    """Starts a fault every `fault_gap_s` (at most `max_faults_at_once`, never two on the same
    process), every kind in turn in a random order each round, and moves the running ones on."""

    def __init__(
        self, stack: LocalStack, rng: random.Random, engine: Any, config: SoakConfig, say: Any
    ) -> None:
        self.stack, self.rng, self.engine, self.config, self.say = stack, rng, engine, config, say
        self.active: list[Fault] = []
        self.bag: list[type[Fault]] = []
        self.faults: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()
        self.next_at = rng.uniform(*config.fault_gap_s)

    def turn(self, now: float) -> None:
        for fault in list(self.active):
            if _safely(fault.advance, False):
                self.active.remove(fault)
                self.outcomes.update(fault.outcomes)
        if now < self.next_at or len(self.active) >= self.config.max_faults_at_once:
            return
        self.next_at = now + self.rng.uniform(*self.config.fault_gap_s)
        if not self.bag:
            self.bag = self.rng.sample(FAULTS, len(FAULTS))
        running = {f.name for f in self.active}
        kind = next((f for f in self.bag if f.name not in running), self.bag[0])
        self.bag.remove(kind)
        busy = {p for f in self.active for p in f.busy}
        free = [n for n in [*self.stack.names, STANDBY_DISPATCHER] if n not in busy]
        fault = kind(self.stack, self.rng, self.engine)
        if _safely(partial(fault.begin, free), False):
            self.faults[kind.name] += 1
            self.active.append(fault)
            self.say(f"soak: +{now:5.0f} s {kind.name}")

    def heal(self) -> None:
        """End every fault, start every process again, stop the second dispatcher."""
        for fault in self.active:
            fault.heal()
        for name in self.stack.names:
            if name == "postgres" and not self.stack.private_postgres:
                continue
            if not self.stack.running(name):
                self.stack.start(name)
        if self.stack.running(STANDBY_DISPATCHER):
            self.stack.stop(STANDBY_DISPATCHER)


def _drain(engine: Any, tenants: Tenants, names: list[str], timeout: float) -> None:
    """Resume every paused job and wait until each job is in a final state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = _safely(lambda: soak_jobs(engine, names), None)
        if jobs is None:
            time.sleep(1.0)
            continue
        open_jobs = [j for j in jobs if j["state"] not in FINAL]
        if not open_jobs:
            return
        for tenant in tenants.tenants:
            for job_id in [j["id"] for j in open_jobs if j["state"] == "paused"]:
                try:
                    tenant.client.resume(job_id)
                except Exception:  # noqa: BLE001, S112 - another tenant's job (404)
                    continue
        time.sleep(1.0)


def run_soak(stack: LocalStack, config: SoakConfig, say: Any = print) -> Summary:
    """Run the soak on a running stack; the stack is healed again when it returns."""
    from service.db import make_engine

    rng = random.Random(config.seed)
    engine = make_engine(stack.database_url or "")
    bucket = Bucket(stack.s3_client())
    run = f"soak{config.seed}-{int(time.time())}"
    names = [f"{run}-t{k}" for k in range(config.tenants)]
    tenants = Tenants(
        [Tenant(n, _client(stack, stack.create_key(n))) for n in names],
        {},
        rng,
        max_active=config.max_active,
    )
    try:
        with tempfile.TemporaryDirectory() as tmp:
            tenants.specs = menu(upload_sources(stack, Path(tmp)))
        say(f"soak: reference runs of {len(tenants.specs)} specs")
        references = _references(tenants.tenants[0], tenants.specs, bucket)
        say(f"soak: {config.seconds:.0f} s of faults")
        chaos = Chaos(stack, rng, engine, config, say)
        started = time.monotonic()
        try:
            while time.monotonic() - started < config.seconds:
                tenants.act()
                chaos.turn(time.monotonic() - started)
                time.sleep(rng.uniform(*config.action_gap_s))
        finally:
            chaos.heal()
        chaos_s = time.monotonic() - started
        say("soak: healed; draining")
        _drain(engine, tenants, names, config.drain_timeout_s)
        verdict = Verdict()
        for job in soak_jobs(engine, names):
            if job["seed"] in references:  # the references themselves are jobs too
                check_job(verdict, job, references[job["seed"]], bucket, engine)
        return Summary(
            chaos_s, chaos.faults, tenants.actions, tenants.refused, verdict, chaos.outcomes
        )
    finally:
        for tenant in tenants.tenants:
            tenant.client.close()
        engine.dispose()
