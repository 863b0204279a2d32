"""Service ceiling: images/s one worker's service path can carry when the model costs nothing.

A CEILING OF THE SERVICE, NOT A MODEL FIGURE. The model is replaced by precomputed tensors (a bank
of person-like float images indexed by item), so what is timed is everything the service does
around the model: the executor (uint8 conversion, the encode pool's compression and hashing),
the shard writer (tar + parquet + marker), the storage (a local folder) and the job's database
rows (SQLite), from `run_job` to the finalised manifest. On a GPU fast enough to make images for
free, this is what one worker could deliver.

For each size (128×64, 256×256) and each encode-pool size (0 = serial in the model's thread, then
1…N threads), a `sample` job of PNGs runs through `run_job`. Beside it, in the same rounds (the
machine is shared, so only figures of one run are compared), the same images are encoded on one
core with nothing else: the pure single-core encode rate, and by N threads at once.

    python bench/service_ceiling.py [--sizes 128x64 256x256] [--workers 2] [--rounds 3]
Last line: ceiling_ratio=<service images/s with N pool threads ÷ (N × single-core encode rate)>,
at the first size (target ≥ 0.8 at 128×64 on 2 cores).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.encode_gil import person_like_images, rate  # noqa: E402
from service.encode_pool import default_workers  # noqa: E402
from service.executor import PipelineCache  # noqa: E402
from service.jobs import Context, open_context, submit, tenant_id  # noqa: E402
from service.runner import run_job  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.specs import OutputFormat, parse_spec  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "service_ceiling.json"


class PrecomputedPipeline:
    """Stands in for DPIGPipeline in this benchmark only: `sample` returns stored images, so the
    timing holds no model work. Item i gets image i mod the bank's size."""

    factors = ("fg", "bg", "pose")
    precision = "fp32"
    device = torch.device("cpu")

    def __init__(self, bank: torch.Tensor, batch_size: int) -> None:
        self.bank, self.batch_size = bank, batch_size  # [K, 3, H, W] in [−1, 1]

    def sample_factors(self, items: list[int], seed: int, **_: Any) -> Any:
        # the labels' keypoints come from the factors' rcv [B, 18, 3] (row, column, visible)
        rcv = torch.rand(len(items), 18, 3, generator=torch.Generator().manual_seed(seed))
        return SimpleNamespace(items=items, rcv=rcv * torch.tensor([64.0, 32.0, 1.0]))

    def render(self, factors: Any) -> torch.Tensor:
        return self.bank[torch.as_tensor(factors.items) % len(self.bank)]


class PrecomputedPipes(PipelineCache):
    def __init__(self, pipe: PrecomputedPipeline) -> None:
        super().__init__(batch_size=pipe.batch_size)
        self.pipe = pipe

    def get(self, ctx: Context, name: str, weights_sha256: str, execution: Any = None) -> Any:
        return self.pipe


def timed(items: int, run: Any, *args: Any) -> tuple[float, float]:
    """(the images/s that `run` returns, CPU seconds of this process, all threads, per image)."""
    cpu = time.process_time()
    images_per_s = run(*args)
    return images_per_s, (time.process_time() - cpu) / items


def service_rate(
    home: Path, pipes: PrecomputedPipes, items: int, workers: int, chunk: int
) -> tuple[float, float]:
    """(images/s, CPU seconds per image) of one `sample` job of `items` PNGs through run_job,
    with a pool of `workers` threads; both over run_job alone (not the database's creation)."""
    ctx = open_context(Settings.from_values(home=home, encode_workers=workers), embedded=True)
    spec = parse_spec({"kind": "sample", "count": items, "chunk_size": chunk})
    job = submit(ctx, tenant_id(ctx), spec)
    cpu, started = time.process_time(), time.perf_counter()
    state = run_job(ctx, job.id, pipes)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    if state != "completed":
        raise RuntimeError(f"the ceiling job ended {state}")
    return items / seconds, cpu / items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["128x64", "256x256"])
    parser.add_argument("--workers", type=int, default=default_workers(), help="largest pool")
    parser.add_argument("--items", type=int, default=3072, help="per job at 128x64 (÷8 larger)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    fmt = OutputFormat()
    load_before = os.getloadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, ThreadPoolExecutor(args.workers) as threads:
        for size in args.sizes:
            height, width = map(int, size.split("x"))
            items = max(args.batch_size * 4, args.items * 128 * 64 // (height * width))
            pixels = person_like_images(256, height, width)
            bank = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            pipes = PrecomputedPipes(PrecomputedPipeline(bank, args.batch_size))
            images = np.resize(pixels, (items, *pixels.shape[1:]))  # the same items, in order
            pools = [0, *range(1, args.workers + 1)]
            names = ["encode_1_core", "encode_n_threads", *(f"service_pool_{w}" for w in pools)]
            runs: dict[str, list[float]] = {name: [] for name in names}
            cpu: dict[str, list[float]] = {name: [] for name in names}
            for r in range(args.rounds):  # interleaved, so that drifts hit every figure alike
                measured = {
                    "encode_1_core": timed(items, rate, None, 1, images, fmt),
                    "encode_n_threads": timed(items, rate, threads, args.workers, images, fmt),
                }
                for w in pools:
                    home = Path(tmp) / f"{size}-{r}-{w}"
                    measured[f"service_pool_{w}"] = service_rate(
                        home, pipes, items, w, args.chunk_size
                    )
                for name, (images_per_s, cpu_per_image) in measured.items():
                    runs[name].append(images_per_s)
                    cpu[name].append(cpu_per_image * 1000)
            row: dict[str, Any] = {"size": size, "items": items}
            row |= {name: round(statistics.median(v), 1) for name, v in runs.items()}
            row["cpu_ms_per_image"] = {n: round(statistics.median(v), 3) for n, v in cpu.items()}
            row["runs"] = {name: [round(x, 1) for x in v] for name, v in runs.items()}
            best = row[f"service_pool_{args.workers}"]
            row["ceiling_ratio"] = round(best / (args.workers * row["encode_1_core"]), 4)
            # what contention cannot move: CPU per image of pure encoding ÷ that of the service
            row["cpu_ratio"] = round(
                row["cpu_ms_per_image"]["encode_1_core"]
                / row["cpu_ms_per_image"][f"service_pool_{args.workers}"],
                4,
            )
            # against what N threads of pure encoding reached beside it (the cores really free)
            row["ratio_to_n_thread_encode"] = round(best / row["encode_n_threads"], 4)
            rows.append(row)
            print(
                f"{size}: encode 1 core {row['encode_1_core']:.0f}/s, {args.workers} threads "
                f"{row['encode_n_threads']:.0f}/s; service "
                + ", ".join(f"pool {w}: {row[f'service_pool_{w}']:.0f}/s" for w in pools)
                + f"; ratio {row['ceiling_ratio']:.3f}, CPU ratio {row['cpu_ratio']:.3f}, "
                f"to {args.workers}-thread encode {row['ratio_to_n_thread_encode']:.3f}"
            )
    result = {
        "benchmark": "service_ceiling",
        "label": "ceiling of the service path with the model replaced by stored tensors",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "cores": args.workers,
        "format": "png",
        "batch_size": args.batch_size,
        "chunk_size": args.chunk_size,
        "storage": "local folder, SQLite (embedded)",
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "results": rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"ceiling_ratio={rows[0]['ceiling_ratio']:.3f}")


if __name__ == "__main__":
    main()
