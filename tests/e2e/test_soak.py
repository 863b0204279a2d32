"""The chaos soak, short form (issue 17): three tenants submit, cancel, pause, resume and retry
jobs of every kind while faults hit the stack at random for about 3 minutes: SIGKILL of worker
children and parents, SIGSTOP of a worker past its lease (SIGCONT after its chunk was re-run),
a second dispatcher, dispatcher and API kills, Redis FLUSHALL and restart, S3 stop and start,
and PostgreSQL restarts. Afterwards nothing is stuck, every completed or cancelled job's items
are byte-identical to an undisturbed reference run, every manifest row's object holds its
sha256, nothing is duplicated and the counts are the manifests'. `bench/soak.py --minutes 30`
is the long form."""

from __future__ import annotations

import os
from typing import Any

import pytest

from service.soak.run import SoakConfig, run_soak

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

SOAK_SECONDS = float(os.environ.get("DPIG_SOAK_SECONDS", "180"))


def test_chaos_soak(stack: Any, capsys: pytest.CaptureFixture[str]) -> None:
    summary = run_soak(stack, SoakConfig(seconds=SOAK_SECONDS, seed=1), say=print)
    with capsys.disabled():  # the summary line shows in CI's log, passed or not
        print(f"\n{summary.line()}")
    verdict = summary.verdict
    assert verdict.stuck == 0 and verdict.mismatches == 0, verdict.problems
    # the drill did drill: faults of most kinds, and jobs that both completed and were cancelled
    assert sum(summary.faults.values()) >= SOAK_SECONDS / 15, summary.faults
    assert verdict.states["completed"] > 0, verdict.states
    assert verdict.items > 0
