"""Benchmark the decoder's fast input conv (spec §9 note) against the plain conv, on CPU.

The first decoder conv sees E spatially constant embedding channels plus 18 pose maps. The plain
path tiles the embedding and convolves all E + 18 channels; the fast path convolves only the pose
maps and adds the exact zero-padded contribution of the constant channels (`constant_input_conv`).

Times, under `torch.inference_mode()`, the input conv alone and the whole decoder forward, plain
vs fast, for `market` at batch 1 and 8 and `market-small` at batch 32: a few warm-up runs, then the
median of several timed runs (plain and fast interleaved, on two copies of the same weights).
Prints a table and writes bench/results/decoder_fast_path.json with every run and the machine load.

    .venv/bin/python bench/decoder_fast_path.py            # full run (a few minutes on 2 cores)
    .venv/bin/python bench/decoder_fast_path.py --quick    # smoke run (seconds)
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from dpig_core.config import PRESETS
from dpig_core.models.decoder import UNetDecoder
from dpig_core.pose import pose_maps

RESULTS = Path(__file__).resolve().parent / "results" / "decoder_fast_path.json"
FULL_CASES = (("market", 1), ("market", 8), ("market-small", 32))
QUICK_CASES = (("market", 1), ("market-small", 32))


def inputs(preset: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random embedding and the pose maps of random keypoints (≈80 % visible)."""
    config = PRESETS[preset]
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(batch, config.embedding_dim, generator=gen)
    rcv = torch.stack(
        [
            torch.randint(0, config.height, (batch, 18), generator=gen).float(),
            torch.randint(0, config.width, (batch, 18), generator=gen).float(),
            (torch.rand(batch, 18, generator=gen) < 0.8).float(),
        ],
        dim=-1,
    )
    return embedding, pose_maps(rcv, config.height, config.width, config.pose_radius)


def time_once(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def time_pair(
    plain: Callable[[], Any], fast: Callable[[], Any], warmup: int, repeats: int
) -> tuple[list[float], list[float]]:
    """Timed runs of both paths, interleaved (plain, fast, fast, plain, …) so that a change in
    machine load during the run affects both alike."""
    for _ in range(warmup):
        plain()
        fast()
    plain_times, fast_times = [], []
    for i in range(repeats):
        if i % 2:
            fast_times.append(time_once(fast))
            plain_times.append(time_once(plain))
        else:
            plain_times.append(time_once(plain))
            fast_times.append(time_once(fast))
    return plain_times, fast_times


def bench_case(preset: str, batch: int, warmup: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    plain_decoder = UNetDecoder(PRESETS[preset]).eval()
    plain_decoder.fast_input_conv = False
    fast_decoder = copy.deepcopy(plain_decoder)
    fast_decoder.fast_input_conv = True
    embedding, maps = inputs(preset, batch)
    row: dict[str, Any] = {"preset": preset, "batch": batch}
    with torch.inference_mode():
        for part in ("input_conv", "forward"):
            plain = functools.partial(getattr(plain_decoder, part), embedding, maps)
            fast = functools.partial(getattr(fast_decoder, part), embedding, maps)
            diff = (fast() - plain()).abs().max().item()
            plain_times, fast_times = time_pair(plain, fast, warmup, repeats)
            row[f"{part}_plain_s"] = statistics.median(plain_times)
            row[f"{part}_fast_s"] = statistics.median(fast_times)
            row[f"{part}_speedup"] = row[f"{part}_plain_s"] / row[f"{part}_fast_s"]
            row[f"{part}_plain_min_s"] = min(plain_times)
            row[f"{part}_fast_min_s"] = min(fast_times)
            row[f"{part}_speedup_min"] = min(plain_times) / min(fast_times)
            row[f"{part}_max_abs_diff"] = diff
            row[f"{part}_plain_runs_s"] = plain_times
            row[f"{part}_fast_runs_s"] = fast_times
    return row


def print_table(rows: list[dict[str, Any]]) -> None:
    """Medians in ms and their ratio; `(min)` is the ratio of the fastest runs, which is the more
    robust figure when other processes compete for the cores."""
    header = (
        f"{'preset':<13}{'batch':>6} | {'input conv plain':>16}{'fast':>9}{'speed-up':>9}"
        f"{'(min)':>7} | {'decoder plain':>13}{'fast':>9}{'speed-up':>9}{'(min)':>7} | "
        f"{'max |Δ|':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['preset']:<13}{r['batch']:>6} | "
            f"{r['input_conv_plain_s'] * 1e3:>13.1f} ms{r['input_conv_fast_s'] * 1e3:>6.1f} ms"
            f"{r['input_conv_speedup']:>8.2f}x{r['input_conv_speedup_min']:>6.2f}x | "
            f"{r['forward_plain_s'] * 1e3:>10.0f} ms{r['forward_fast_s'] * 1e3:>6.0f} ms"
            f"{r['forward_speedup']:>8.2f}x{r['forward_speedup_min']:>6.2f}x | "
            f"{r['forward_max_abs_diff']:>8.1e}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer cases and runs (a smoke test)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs per timing")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per timing")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON output path")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    cases = QUICK_CASES if args.quick else FULL_CASES

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}; warm-up {warmup}, median of {repeats}"
    )
    rows = [bench_case(preset, batch, warmup, repeats) for preset, batch in cases]
    print_table(rows)

    report = {
        "benchmark": "decoder_fast_path",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "quick": args.quick,
        "warmup": warmup,
        "repeats": repeats,
        "statistic": "median seconds per call (also min, and every run)",
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
