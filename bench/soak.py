"""The chaos soak, long form (issue 17; docs/operations.md, "Chaos soak").

Starts a private local stack (service/localstack.py: PostgreSQL, Redis, SeaweedFS, the API, the
dispatcher and two workers, with the e2e tests' short leases), runs service/soak/run.py on it
for `--minutes` of faults, drains, checks every job, and stops the stack.

    python bench/soak.py --minutes 30 [--seed 0] [--workers 2]

Last line: `soak seconds=... faults=N (...) jobs=N (...) items=N ... stuck=0 mismatches=0`;
the exit code is 1 when anything was stuck or mismatched.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.localstack import LocalStack, StackConfig  # noqa: E402
from service.soak.run import SoakConfig, run_soak  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "soak.json"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="of faults")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    def say(text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {text}", flush=True)

    with tempfile.TemporaryDirectory(prefix="dpig-soak-") as tmp:
        config = StackConfig(
            workers=args.workers,
            lease_seconds=8,
            republish_after_s=5.0,
            batch_size=4,
            die_with_parent=True,
            extra_env={"DPIG_S3_MAX_ATTEMPTS": "3"},
        )
        stack = LocalStack(Path(tmp) / "stack", config)
        say(f"starting a local stack in {stack.root}")
        stack.up()
        try:
            summary = run_soak(stack, SoakConfig(seconds=args.minutes * 60, seed=args.seed), say)
        finally:
            stack.down()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "soak",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "minutes": args.minutes,
        "seed": args.seed,
        "faults": dict(summary.faults),
        "actions": dict(summary.actions),
        "refused": dict(summary.refused),
        "jobs": dict(summary.verdict.states),
        "items": summary.verdict.items,
        "failed_items": summary.verdict.failed_items,
        "dead_chunks": dict(summary.verdict.dead_chunks),  # last error → how many
        "stuck": summary.verdict.stuck,
        "mismatches": summary.verdict.mismatches,
        "problems": summary.verdict.problems,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for problem in summary.verdict.problems:
        print(f"problem: {problem}")
    for error, count in summary.verdict.dead_chunks.items():
        print(f"dead chunks ({count}): {error}")
    print(summary.line())
    return 0 if summary.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
