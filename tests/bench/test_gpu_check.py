"""bench/gpu_check.py --dry-run: the GPU check's code runs end to end on the CPU at tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_gpu_check_runs_dry_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DPIG_HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--dry-run", "--json", str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines()[-1].startswith("gpu_check=dry-run sections=4 skipped=0")
    result = json.loads(out.read_text())
    assert result["dry_run"] and result["machine"]["device"] == "cpu"
    # fp32 and bf16 × channels_last (× compile with bf16 + channels_last) at one batch size
    assert len(result["throughput"]) == 5
    assert all(row["images_per_s"] > 0 for row in result["throughput"])
    assert result["bf16_vs_fp32"][0]["items"] == 8
    assert [row["preset"] for row in result["service"]] == ["market-small", "tiny"]
    for service in result["service"]:
        assert service["state"] == "completed" and service["service_images_per_s"] > 0
    fp32 = next(r for r in result["determinism"] if r["precision"] == "fp32")
    assert fp32["repeatable"] and fp32["batches"] == [1, 3, 4]
