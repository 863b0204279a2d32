"""Raw generation throughput of the pipeline (no service): images/s per preset and batch size.

Each case samples new people with `DPIGPipeline.sample` (Φ for every factor, pose decoder,
decoder) on randomly initialised weights of the preset (throughput does not depend on the
weights), after warm-up runs, and reports the median of timed runs, images/s and the achieved
decoder FLOP/s against the preset's decoder cost (model_info). On CUDA it also compares fp32 and
bf16, channels_last and torch.compile; on the CPU it runs fp32 with and without channels_last.

    python bench/model_throughput.py                       # CPU: tiny and market-small
    python bench/model_throughput.py --presets market --batch 64 256 --device cuda
    python bench/model_throughput.py --presets market --batch 1 8 --threads 1 2 --append
Last line: best_images_per_s=<value> (<case>).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from dpig_core.config import get_preset
from dpig_core.model_info import model_info
from dpig_core.models import DPIG
from dpig_core.pipeline import DPIGPipeline

RESULTS = Path(__file__).resolve().parent / "results" / "model_throughput.json"


def _time(pipe: DPIGPipeline, batch: int, runs: int, warmup: int) -> list[float]:
    items = list(range(batch))
    for _ in range(warmup):
        pipe.sample(items, seed=0)
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for r in range(runs):
        started = time.perf_counter()
        pipe.sample(items, seed=r + 1)
        if pipe.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times


def _variants(device: str) -> list[dict[str, Any]]:
    if device == "cuda":
        return [
            {"precision": "fp32"},
            {"precision": "bf16"},
            {"precision": "bf16", "channels_last": True},
            {"precision": "bf16", "channels_last": True, "compile": True},
        ]
    return [{"precision": "fp32"}, {"precision": "fp32", "channels_last": True}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "market-small"])
    parser.add_argument("--batch", nargs="+", type=int, default=[8, 32, 128])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", nargs="+", type=int, default=[torch.get_num_threads()])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--append", action="store_true", help="add to the rows already in --out")
    args = parser.parse_args()
    rows = []
    if args.append and args.out.exists():
        rows = json.loads(args.out.read_text())["rows"]
    for threads, preset in [(t, p) for t in args.threads for p in args.presets]:
        torch.set_num_threads(threads)
        config = get_preset(preset)
        decoder_flops = 2 * model_info(config)["networks"]["decoder"]["macs"]
        for variant in _variants(args.device):
            for batch in args.batch:
                torch.manual_seed(0)
                pipe = DPIGPipeline(DPIG(config), device=args.device, batch_size=batch, **variant)
                times = _time(pipe, batch, args.runs, args.warmup)
                median = statistics.median(times)
                row = {
                    "preset": preset, "batch": batch, "threads": threads, **variant,
                    "median_s": round(median, 4), "images_per_s": round(batch / median, 1),
                    "decoder_tflops": round(decoder_flops * batch / median / 1e12, 3),
                }  # fmt: skip
                rows.append(row)
                print(json.dumps(row))
                del pipe
    machine = {
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "cpu_count": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    best = max(rows, key=lambda r: r["images_per_s"])
    label = ", ".join(f"{k}={v}" for k, v in best.items() if k not in ("median_s", "images_per_s"))
    print(f"best_images_per_s={best['images_per_s']} ({label})")


if __name__ == "__main__":
    main()
