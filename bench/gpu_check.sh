#!/usr/bin/env bash
# The GPU check: every GPU figure dpig needs, in one command of at most 8 minutes on one
# H100/H200 (bench/gpu_check.py; docs/performance.md, "GPU check"). Writes
# bench/results/gpu_check.json. Extra arguments go to the Python part, e.g. --dry-run on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec timeout --signal=INT --kill-after=20 480 "$PYTHON" bench/gpu_check.py "$@"
