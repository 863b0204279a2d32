"""bench/finalize.py at a tiny size: its synthetic shards still pass the finaliser's checks, with
and without worker-made manifest lines (it broke once, silently, when the manifest gained a
column)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("lines", [[], ["--without-lines"]])
def test_the_finalize_benchmark_runs_at_a_tiny_size(tmp_path: Path, lines: list[str]) -> None:
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        "DPIG_HOME": str(tmp_path),
        "TMPDIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "finalize.py"), "--items", "2500",
         "--chunk-size", "1000", *lines],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    first, last = done.stdout.splitlines()[-2:]
    assert first.startswith("items=2500 chunks=3 ")
    assert re.fullmatch(r"peak_rss_mib=\d+ seconds=\d+\.\d", last)
