"""Service efficiency (DESIGN §8): end-to-end images/s through the service divided by a bare
in-process loop on the same model, batch size, device and torch threads, measured in one run.

- Bare loop: `DPIGPipeline.from_pretrained(model, batch_size=B)` → `pipe.sample(items, seed)` in
  micro-batches of B → PNG bytes in memory (encoded exactly as the worker does), N items, after
  one warm-up batch, with the stack down.
- Service: a local stack (service/localstack.py: a private PostgreSQL, Redis, SeaweedFS S3, the
  API, the dispatcher at its production tick of 1 s, and one worker with B and the same threads).
  A small warm-up job loads the model in the worker first (a one-off per worker, not
  throughput); then a `sample` job of N items in chunks of C is submitted through the HTTP API
  and timed from the POST to the job's `finished_at` (polling GET /v1/jobs/{id});
  images/s = N / that time.
- Bare and service runs alternate (`--rounds` service runs between bare runs), and each side's
  seconds are averaged, so that the drifts of a shared machine hit both sides alike.
- Checks and breakdown: the job's manifest (sha256 of every PNG) must equal the bare loop's
  bytes; the worker's `dpig_stage_seconds_total` is scraped before and after the job; the CPU
  seconds of every stack process during the job are read from /proc (`cpu_efficiency` = bare CPU
  seconds ÷ worker CPU seconds, which contention from other programs does not move);
  `--profile` records the worker child with py-spy (raw folded stacks).

    python bench/service_efficiency.py [--items 2048] [--chunk-size 256] [--batch-size 32]
        [--threads 1] [--rounds 2] [--model DIR] [--profile]
Last line: efficiency=<service images/s ÷ bare images/s>.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _png(image: Any) -> bytes:
    """The serial encoding the worker had before its encode pool (the same bytes as
    `service.encoding.encode_uint8` with the default png options)."""
    from PIL import Image

    from dpig_core.imaging import to_uint8

    buf = io.BytesIO()
    Image.fromarray(to_uint8(image)).save(buf, format="PNG")
    return buf.getvalue()


def bare_loop(model: Path, items: int, batch: int, seed: int) -> tuple[float, float, list[str]]:
    """Wall and CPU seconds for `items` images (inference + PNG in memory), and each PNG's
    sha256."""
    from dpig_core.pipeline import DPIGPipeline

    pipe = DPIGPipeline.from_pretrained(model, device="cpu", batch_size=batch)
    pipe.sample(list(range(batch)), seed + 1)  # warm-up: first-call allocations
    digests: list[str] = []
    started, cpu = time.perf_counter(), time.process_time()
    for start in range(0, items, batch):
        images = pipe.sample(list(range(start, min(start + batch, items))), seed)
        for image in images:
            digests.append(hashlib.sha256(_png(image)).hexdigest())
    return time.perf_counter() - started, time.process_time() - cpu, digests


def _stage_seconds(url: str) -> dict[str, float]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            if sample.name == "dpig_stage_seconds_total":
                out[sample.labels["stage"]] = sample.value
    return out


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (0 when it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _stack_cpu(stack: Any) -> dict[str, float]:
    """CPU seconds so far of every stack process with its descendants (a worker's prefork
    child, PostgreSQL's backends, ...), by process name."""
    from service.localstack import descendants

    out: dict[str, float] = {}
    for name, pid in stack.pids.items():
        if stack.running(name):
            out[name] = sum(_cpu_seconds(p) for p in [pid, *descendants(pid)])
    out["bench"] = time.process_time()
    return out


class Api:
    def __init__(self, base: str, key: str) -> None:
        import httpx

        self.http = httpx.Client(
            base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30
        )

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        response = self.http.post("/v1/jobs", json=spec)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def wait(self, job_id: str, timeout: float, poll_s: float = 0.2) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            view: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}").json()
            if view["state"] in ("completed", "failed", "cancelled"):
                return view
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {view['state']} after {timeout:g} s")
            time.sleep(poll_s)


def _manifest_digests(stack: Any, job_id: str) -> list[str]:
    import pyarrow.parquet as pq

    from service.localstack import BUCKET, STORAGE_PREFIX

    key = f"{STORAGE_PREFIX}/jobs/{job_id}/manifest.parquet"
    data = stack.s3_client().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    rows = pq.read_table(io.BytesIO(data)).to_pylist()
    return [r["sha256"] for r in sorted(rows, key=lambda r: r["item"])]


def _worker_child(stack: Any) -> int | None:
    children = stack.children("worker-0")
    return children[0] if children else None


def run_service(args: argparse.Namespace, model: Path) -> dict[str, Any]:
    from service.localstack import LocalStack, StackConfig

    threads = str(args.threads)
    config = StackConfig(
        workers=1,
        postgres_url=args.postgres_url,  # default: a private server, so its CPU is measurable
        batch_size=args.batch_size,
        # `dpig dispatcher`'s own default (production), not the stack's test-speed 0.2 s
        dispatch_interval_s=args.dispatch_interval,
        die_with_parent=True,
        extra_env={"DPIG_MODEL": str(model)},
        worker_env={"DPIG_TORCH_THREADS": threads, "OMP_NUM_THREADS": threads},
    )
    root = Path(tempfile.mkdtemp(prefix="dpig-efficiency-"))
    stack = LocalStack(root, config)
    started = time.perf_counter()
    stack.up()
    out: dict[str, Any] = {"stack_up_s": round(time.perf_counter() - started, 2)}
    profiler = None
    try:
        assert stack.api_key is not None
        api = Api(stack.api_url, stack.api_key)
        spec = {"kind": "sample", "seed": args.seed, "model": "default"}
        warm_started = time.perf_counter()
        warm = api.submit(spec | {"count": args.batch_size, "chunk_size": args.batch_size})
        api.wait(warm["id"], timeout=600)
        out["warmup_job_s"] = round(time.perf_counter() - warm_started, 2)
        metrics_url = stack.metrics_url("worker-0")
        before = _stage_seconds(metrics_url)
        if args.profile:
            child = _worker_child(stack)
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            out["profile"] = str(args.profile_out)
            profiler = subprocess.Popen(
                [py_spy, "record", "--pid", str(child), "--rate", "50", "--format", "raw",
                 "--output", str(args.profile_out), "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )  # fmt: skip
        cpu_before = _stack_cpu(stack)
        t0 = time.time()
        job = api.submit(spec | {"count": args.items, "chunk_size": args.chunk_size})
        submitted = time.time() - t0
        view = api.wait(job["id"], timeout=3600, poll_s=args.poll)
        polled = time.time() - t0
        if profiler is not None:
            profiler.send_signal(2)  # SIGINT: py-spy writes its output and exits
            profiler.wait(timeout=60)
        if view["state"] != "completed" or view["done_items"] != args.items:
            raise RuntimeError(f"job ended {view['state']} with {view['done_items']} done")
        finished = dt.datetime.fromisoformat(view["finished_at"]).timestamp()
        created = dt.datetime.fromisoformat(view["created_at"]).timestamp()
        started_at = dt.datetime.fromisoformat(view["started_at"]).timestamp()
        cpu_after = _stack_cpu(stack)
        after = _stage_seconds(metrics_url)
        out |= {
            "cpu_seconds": {
                k: round(cpu_after[k] - cpu_before.get(k, 0.0), 2) for k in sorted(cpu_after)
            },
            "job_id": job["id"],
            "seconds": round(finished - t0, 3),
            "seconds_polled": round(polled, 3),
            "submit_s": round(submitted, 3),
            "first_claim_s": round(started_at - created, 3),
            "stage_seconds": {k: round(after[k] - before.get(k, 0.0), 3) for k in sorted(after)},
            "digests": _manifest_digests(stack, job["id"]),
        }
    finally:
        if profiler is not None and profiler.poll() is None:
            profiler.kill()
        stack.down()
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2048)
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    parser.add_argument("--rounds", type=int, default=2, help="service runs (bare ones: +1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dispatch-interval", type=float, default=1.0, help="seconds per tick")
    parser.add_argument("--poll", type=float, default=1.0, help="seconds between job polls")
    parser.add_argument("--model", type=Path, default=None, help="weights folder (bundled)")
    parser.add_argument(
        "--postgres-url", default=None, help="reuse this running server (admin URL)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy the worker's timed job")
    parser.add_argument(
        "--profile-out", type=Path, default=ROOT / "bench" / "results" / "service_worker.pyspy"
    )
    parser.add_argument(
        "--json", type=Path, default=ROOT / "bench" / "results" / "service_efficiency.json"
    )
    args = parser.parse_args()
    # the same threads as the worker, set before torch is imported
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    from service.jobs import bundled_model_dir

    torch.set_num_threads(args.threads)
    model = (args.model or bundled_model_dir()).resolve()

    # Bare and service runs alternate (bare, service, bare, ..., bare; the stack is down during
    # every bare run) and each side's seconds are averaged: the slow drifts of a shared machine
    # then hit both sides alike. A round's own ratio uses the bare runs on either side of it.
    n = args.items
    bare_runs: list[dict[str, float]] = []
    service_runs: list[dict[str, Any]] = []
    reference: list[str] | None = None

    def bare() -> None:
        nonlocal reference
        seconds, cpu, digests = bare_loop(model, n, args.batch_size, args.seed)
        reference = reference or digests
        bare_runs.append({"seconds": round(seconds, 3), "cpu_seconds": round(cpu, 2)})
        print(f"bare loop: {n} images in {seconds:.2f} s = {n / seconds:.1f} images/s")

    load_before = os.getloadavg()
    bare()
    for _ in range(args.rounds):
        run = run_service(args, model)
        run["same_png_bytes"] = run.pop("digests") == reference
        service_runs.append(run)
        print(
            f"service:   {n} images in {run['seconds']:.2f} s = {n / run['seconds']:.1f} "
            f"images/s (stack up {run['stack_up_s']} s, warm-up job {run['warmup_job_s']} s, "
            f"same PNG bytes: {run['same_png_bytes']})"
        )
        print(f"  worker stage seconds: {run['stage_seconds']}")
        print(f"  CPU seconds during the job: {run['cpu_seconds']}")
        bare()
    for k, run in enumerate(service_runs):
        around = (bare_runs[k]["seconds"] + bare_runs[k + 1]["seconds"]) / 2
        run["ratio_to_adjacent_bare"] = round(around / run["seconds"], 4)
    bare_s = sum(r["seconds"] for r in bare_runs) / len(bare_runs)
    service_s = sum(r["seconds"] for r in service_runs) / len(service_runs)
    bare_rate, service_rate = n / bare_s, n / service_s
    ratio = service_rate / bare_rate
    # contention-free view: CPU seconds per image of the worker vs the bare loop, and the CPU
    # the rest of the stack spent beside the worker
    bare_cpu = sum(r["cpu_seconds"] for r in bare_runs) / len(bare_runs)
    worker_cpu = sum(r["cpu_seconds"]["worker-0"] for r in service_runs) / len(service_runs)
    others_cpu = sum(
        sum(v for k, v in r["cpu_seconds"].items() if k != "worker-0") for r in service_runs
    ) / len(service_runs)
    print(
        f"mean: bare {bare_rate:.1f} images/s, service {service_rate:.1f} images/s; "
        f"worker CPU {worker_cpu:.1f} s vs bare CPU {bare_cpu:.1f} s, rest of the stack "
        f"{others_cpu:.1f} CPU s; load average {os.getloadavg()[0]:.2f}"
    )
    result = {
        "benchmark": "service_efficiency",
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "device": "cpu",
        "torch_threads": args.threads,
        "items": n,
        "chunk_size": args.chunk_size,
        "batch_size": args.batch_size,
        "model": str(model),
        "dispatch_interval_s": args.dispatch_interval,
        "load_average_before": [round(x, 2) for x in load_before],
        "bare": {"runs": bare_runs, "seconds": round(bare_s, 3),
                 "images_per_s": round(bare_rate, 2)},
        "service": {"runs": service_runs, "seconds": round(service_s, 3),
                    "images_per_s": round(service_rate, 2)},
        "cpu_efficiency": round(bare_cpu / worker_cpu, 4),
        "stack_cpu_seconds_beside_worker": round(others_cpu, 2),
        "same_png_bytes": all(r["same_png_bytes"] for r in service_runs),
        "efficiency": round(ratio, 4),
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"efficiency={ratio:.3f}")


if __name__ == "__main__":
    main()
