"""Does PIL release the GIL while it compresses? Threads vs processes for PNG/WebP/JPEG encoding.

The same images are encoded by 1 thread, by N threads and by N processes, interleaved in one run
(the machine is shared, so only ratios inside one run mean anything). If the N-thread rate is
close to the N-process rate, compression runs outside the GIL and a thread pool is enough.

    python bench/encode_gil.py --workers 2 --sizes 128x64 256x256
A contention-proof check beside it (`gil_probe`): how much Python work the main thread does while
another thread encodes one large image, relative to while that thread sleeps (≈ 1: the GIL is
released during compression; ≈ 0: it is held).
Last line: gil_thread_vs_process=<N-thread rate ÷ N-process rate, worst format at the first size>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from service.encoding import encode_uint8
from service.specs import OutputFormat

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "encode_gil.json"
FORMATS = {
    "png": OutputFormat(),
    "png-level1": OutputFormat(compress_level=1),
    "webp-lossless": OutputFormat(format="webp", lossless=True),
    "webp-q90": OutputFormat(format="webp", quality=90),
    "jpeg-q90": OutputFormat(format="jpeg", quality=90),
}


def person_like_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """uint8 [count, H, W, 3]: smooth colour fields plus mild noise, which compress about as
    hard as the model's outputs (pure noise would be far slower, flat colour far faster)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (count, height // 8 + 1, width // 8 + 1, 3)).astype(np.float32)
    smooth = coarse.repeat(8, axis=1).repeat(8, axis=2)[:, :height, :width]
    noisy = smooth + rng.normal(0, 6, smooth.shape)
    out: np.ndarray = noisy.clip(0, 255).astype(np.uint8)
    return out


def _encode_all(images: np.ndarray, fmt: OutputFormat) -> int:
    return sum(len(encode_uint8(image, fmt)) for image in images)


def rate(pool: Executor | None, workers: int, images: np.ndarray, fmt: OutputFormat) -> float:
    """Images/s with `workers` equal slices of `images` encoded at once in `pool` (None: here)."""
    started = time.perf_counter()
    if pool is None:
        _encode_all(images, fmt)
    else:
        slices = np.array_split(images, workers)
        list(pool.map(_encode_all, slices, [fmt] * workers))
    return len(images) / (time.perf_counter() - started)


def gil_probe(fmt: OutputFormat, side: int = 1536) -> float:
    """Python work the main thread gets done while another thread encodes one large image,
    relative to while that thread sleeps as long: about 1 if the encoder releases the GIL,
    near 0 if it holds it. Shared cores slow both runs alike, so this needs no idle machine."""
    image = person_like_images(1, side, side)[0]

    def count_while(thread: threading.Thread) -> tuple[int, float]:
        count, started = 0, time.perf_counter()
        thread.start()
        while thread.is_alive():
            count += 1
        return count, time.perf_counter() - started

    busy, seconds = count_while(threading.Thread(target=encode_uint8, args=(image, fmt)))
    idle, idle_seconds = count_while(threading.Thread(target=time.sleep, args=(seconds,)))
    return (busy / seconds) / (idle / idle_seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", nargs="+", default=["128x64", "256x256"])
    parser.add_argument("--images", type=int, default=400, help="per round at 128x64 (÷8 larger)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results = []
    with (
        ThreadPoolExecutor(args.workers) as threads,
        ProcessPoolExecutor(args.workers) as processes,
    ):
        list(processes.map(int, range(args.workers)))  # start the processes before timing
        for size in args.sizes:
            height, width = map(int, size.split("x"))
            count = max(args.workers * 8, args.images * 128 * 64 // (height * width))
            images = person_like_images(count, height, width)
            for name, fmt in FORMATS.items():
                runs: dict[str, list[float]] = {"serial": [], "threads": [], "processes": []}
                pools: dict[str, tuple[Executor | None, int]] = {
                    "serial": (None, 1),
                    "threads": (threads, args.workers),
                    "processes": (processes, args.workers),
                }
                for _ in range(args.rounds):  # interleaved: each round runs all three
                    for mode, (pool, workers) in pools.items():
                        runs[mode].append(rate(pool, workers, images, fmt))
                row = {"size": size, "format": name} | {
                    mode: statistics.median(values) for mode, values in runs.items()
                }
                row["thread_speedup"] = row["threads"] / row["serial"]
                row["thread_vs_process"] = row["threads"] / row["processes"]
                row["gil_probe"] = round(gil_probe(fmt), 3) if size == args.sizes[0] else None
                results.append(row)
                print(
                    f"{size} {name:9s} serial {row['serial']:8.0f}/s  "
                    f"{args.workers} threads {row['threads']:8.0f}/s  "
                    f"{args.workers} processes {row['processes']:8.0f}/s  "
                    f"threads/serial {row['thread_speedup']:.2f}  "
                    f"threads/processes {row['thread_vs_process']:.2f}"
                    + ("" if row["gil_probe"] is None else f"  GIL probe {row['gil_probe']:.2f}")
                )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "machine": platform.machine(),
                "cpus": os.cpu_count(),
                "load_average": os.getloadavg(),
                "workers": args.workers,
                "results": results,
            },
            indent=2,
        )
    )
    first = [r for r in results if r["size"] == args.sizes[0]]
    print(f"gil_thread_vs_process={min(r['thread_vs_process'] for r in first):.3f}")


if __name__ == "__main__":
    main()
