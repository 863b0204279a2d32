"""bench/service_ceiling.py at a tiny size: the benchmark still runs the executor end to end (it
broke once, silently, when the executor's API changed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_service_ceiling_runs_at_a_tiny_size(tmp_path: Path) -> None:
    out = tmp_path / "service_ceiling.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DPIG_HOME": str(tmp_path)}
    args = ["--sizes", "32x16", "--workers", "2", "--items", "4", "--batch-size", "8",
            "--chunk-size", "24", "--rounds", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "service_ceiling.py"), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("ceiling_ratio=")
    result = json.loads(out.read_text())
    [row] = result["results"]
    assert row["size"] == "32x16" and row["items"] == 64  # 4 items at 128×64 = 64 at 32×16
    for name in ("encode_1_core", "encode_n_threads", *(f"service_pool_{w}" for w in (0, 1, 2))):
        assert row[name] > 0 and row["cpu_ms_per_image"][name] > 0
    assert row["ceiling_ratio"] > 0 and row["cpu_ratio"] > 0
