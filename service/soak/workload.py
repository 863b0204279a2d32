"""The soak's workload: source images in the stack's bucket, a menu of job specs (every kind,
every format) and the tenants that submit, cancel, pause, resume and retry them.

Every menu spec has a seed of its own, so a job's seed names its menu entry, and the reference
run of that entry gives the bytes every item of the job must have."""

from __future__ import annotations

import logging
import random
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.localstack import BUCKET, LocalStack

log = logging.getLogger("dpig.soak")

SOURCES = 6
HEIGHT, WIDTH = 64, 32
# tenant actions and their weights: resumes are frequent, so paused jobs do not pile up
ACTIVE = ("queued", "running", "paused", "finalizing", "cancelling")
ACTIONS = {"submit": 6.0, "cancel": 1.0, "pause": 1.5, "resume": 3.0, "retry": 1.0}


def upload_sources(stack: LocalStack, workdir: Path) -> list[dict[str, Any]]:
    """SOURCES synthetic people (Market-1501 format) under the bucket's shared `sources/`, as
    ImageRef dicts with their true keypoints."""
    from dpig_core.data.readers import read_dataset
    from dpig_core.data.synth import write_market_dataset

    write_market_dataset(workdir / "market", identities=4, per_identity=4, height=HEIGHT,
                         width=WIDTH, seed=17, progress=False)  # fmt: skip
    records = sorted(
        (r for r in read_dataset(workdir / "market").records if r.rcv is not None),
        key=lambda r: r.path,
    )[:SOURCES]
    prefix = f"sources/soak-{uuid.uuid4().hex[:8]}/"
    s3 = stack.s3_client()
    refs = []
    for k, record in enumerate(records):
        key = f"{prefix}person-{k}{record.path.suffix}"
        s3.put_object(Bucket=BUCKET, Key=key, Body=record.path.read_bytes())
        assert record.rcv is not None  # filtered above
        # (row, col, visible) as the dataset has them: missing joints are (-1, -1, 0)
        refs.append({"uri": f"s3://{BUCKET}/{key}", "keypoints": record.rcv.tolist()})
    return refs


def menu(sources: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """seed → spec: a job of each kind, over every output format, in chunks small enough that a
    job spans several workers and faults."""
    folder = sources[0]["uri"].rsplit("/", 1)[0] + "/"
    names = [s["uri"].rsplit("/", 1)[1] for s in sources]
    poses = [{"id": f"pose-{k}", "keypoints": s["keypoints"], "height": HEIGHT, "width": WIDTH}
             for k, s in enumerate(sources)]  # fmt: skip
    swaps = [
        {"fg": sources[i % SOURCES], "bg": sources[(i + 1) % SOURCES],
         "pose": sources[(i + 2) % SOURCES]}
        for i in range(12)
    ]  # fmt: skip
    pairs = [{"a": sources[i], "b": sources[i + 3]} for i in range(3)]
    specs = [
        {"kind": "sample", "count": 40, "chunk_size": 8, "seed": 101},
        {"kind": "sample", "identities": 4, "per_identity": 6, "chunk_size": 6, "seed": 102,
         "output": {"format": "webp", "lossless": True}},
        {"kind": "pose_grid", "images": folder, "poses": poses[:6], "chunk_size": 6,
         "source_keypoints": {n: s["keypoints"] for n, s in zip(names, sources, strict=True)},
         "max_sources": 4, "seed": 103},
        {"kind": "swap", "items": swaps, "chunk_size": 4, "seed": 104,
         "output": {"format": "jpeg", "quality": 90}},
        {"kind": "interpolate", "pairs": pairs, "steps": 4, "chunk_size": 4, "seed": 105},
    ]  # fmt: skip
    return {int(spec["seed"]): spec for spec in specs}


@dataclass
class Tenant:
    """One tenant and its API client."""

    name: str
    client: Any


@dataclass
class Tenants:
    """Several tenants acting at random on their own jobs through the HTTP API. The API may be
    down or the database restarting: a failed call is counted and the soak goes on (a submit
    that failed after the job was created is found again from the database at the end)."""

    tenants: list[Tenant]
    specs: dict[int, dict[str, Any]]
    rng: random.Random
    max_active: int = 6
    actions: Counter[str] = field(default_factory=Counter)
    refused: Counter[str] = field(default_factory=Counter)

    def act(self) -> None:
        """One action of one tenant."""
        tenant = self.rng.choice(self.tenants)
        action = self.rng.choices(list(ACTIONS), weights=list(ACTIONS.values()))[0]
        try:
            self._do(tenant, action)
        except Exception as exc:  # noqa: BLE001 - an outage or a 409: the soak goes on
            self.refused[action] += 1
            log.debug("%s %s: %s", tenant.name, action, exc)

    def _do(self, tenant: Tenant, action: str) -> None:
        if action == "submit":
            if self._active() >= self.max_active:
                return
            seed = self.rng.choice(sorted(self.specs))
            tenant.client.submit(self.specs[seed])
        else:
            wanted = {
                "cancel": ("queued", "running", "paused"),
                "pause": ("queued", "running"),
                "resume": ("paused",),
                "retry": ("completed", "failed"),
            }[action]
            recent = tenant.client.list(limit=50).jobs
            candidates = [j.id for j in recent if j.state in wanted]
            if action == "retry":
                candidates = [j.id for j in recent if j.id in candidates and j.failed_items]
            if not candidates:
                return
            getattr(tenant.client, action)(self.rng.choice(candidates))
        self.actions[action] += 1

    def _active(self) -> int:
        return sum(
            j.state in ACTIVE for tenant in self.tenants for j in tenant.client.list(limit=50).jobs
        )
