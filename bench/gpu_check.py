"""The GPU check (bench/gpu_check.sh): one run of at most 8 minutes on one H100/H200 that writes
every GPU figure dpig needs into one JSON file.

1. `throughput`: raw model images/s per preset × precision (fp32, bf16) × batch ×
   channels_last × torch.compile (compile only with bf16 + channels_last, where it matters).
2. `bf16_vs_fp32`: the same items at both precisions: uint8 pixel differences.
3. `service`: end-to-end images/s of the embedded service (run_job: executor with the overlapped
   encode pool, shard writer, local folder, SQLite) for each service preset, with the model's
   figure for the same settings beside it.
4. `determinism`: the same items at several batch sizes, fp32 and bf16, twice each: identical
   bytes or not.

Sections run in this order under one time budget (`--budget-s`); a case that would start past it
is recorded as skipped, so the JSON is always written. `--dry-run` runs the same code on the
CPU with tiny sizes (the `tiny` preset, small batches; torch.compile with its `eager` backend),
for CI.

    bash bench/gpu_check.sh                  # on the GPU machine
    python bench/gpu_check.py --dry-run      # anywhere
Last line: gpu_check=<ok|dry-run> sections=<n> skipped=<n> seconds=<s>.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dpig_core.config import get_preset  # noqa: E402
from dpig_core.models import DPIG  # noqa: E402
from dpig_core.pipeline import DPIGPipeline  # noqa: E402
from service.encoding import to_uint8_batch  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "gpu_check.json"


class Budget:
    def __init__(self, seconds: float) -> None:
        self.started, self.seconds = time.monotonic(), seconds
        self.skipped: list[str] = []

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)

    def allows(self, case: str, need_s: float = 0.0) -> bool:
        if self.left() > need_s:
            return True
        self.skipped.append(case)
        return False


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _pipe(model: DPIG, device: str, **options: Any) -> DPIGPipeline:
    return DPIGPipeline(model, device=device, images_on_device=True, **options)


def _timed_rate(pipe: DPIGPipeline, batch: int, runs: int, device: str) -> float:
    items = list(range(batch))
    pipe.sample(items, seed=0)  # warm-up (and compilation)
    _sync(device)
    times = []
    for r in range(runs):
        started = time.perf_counter()
        pipe.sample(items, seed=r + 1)
        _sync(device)
        times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def _variants(batches: list[int]) -> list[dict[str, Any]]:
    """precision × channels_last × batch; torch.compile only with bf16 + channels_last."""
    out = []
    for precision in ("fp32", "bf16"):
        for channels_last in (False, True):
            for compile_ in (False, True) if precision == "bf16" and channels_last else (False,):
                out += [
                    {"precision": precision, "channels_last": channels_last,
                     "compile": compile_, "batch_size": batch}
                    for batch in batches
                ]  # fmt: skip
    return out


def throughput(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for preset in args.presets:
        torch.manual_seed(0)
        model = DPIG(get_preset(preset))
        for variant in _variants(args.batch):
            case = f"{preset} " + " ".join(f"{k}={v}" for k, v in variant.items())
            if not budget.allows(case, 60 if variant["compile"] else 5):
                continue
            compile_ = args.compile_backend if variant["compile"] else False
            pipe = _pipe(model, args.device, **(variant | {"compile": compile_}))
            rate = _timed_rate(pipe, variant["batch_size"], args.runs, args.device)
            row = {"preset": preset, **variant, "images_per_s": round(rate, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
            del pipe
        del model
    return rows


def bf16_vs_fp32(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    for preset in args.presets:
        if not budget.allows(f"bf16_vs_fp32 {preset}", 10):
            continue
        torch.manual_seed(0)
        model = DPIG(get_preset(preset))
        items = list(range(args.diff_items))
        out = {}
        for precision in ("fp32", "bf16"):
            pipe = _pipe(model, args.device, precision=precision, batch_size=args.batch[0])
            out[precision] = to_uint8_batch(pipe.sample(items, seed=7)).astype(np.int16)
        diff = np.abs(out["fp32"] - out["bf16"])
        row = {
            "preset": preset,
            "items": len(items),
            "max_abs": int(diff.max()),
            "mean_abs": round(float(diff.mean()), 4),
            "fraction_differing": round(float((diff > 0).mean()), 4),
            "fraction_over_8": round(float((diff > 8).mean()), 5),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def _weights_dir(preset: str, root: Path) -> Path:
    """The bundled weights for market-small; random weights (speed does not depend on them) for
    presets with no trained model here."""
    from dpig_core.weights import save_pretrained
    from service.jobs import bundled_model_dir

    if preset == "market-small":
        return bundled_model_dir()
    torch.manual_seed(0)
    folder = root / f"weights-{preset}"
    save_pretrained(DPIG(get_preset(preset)), folder, name=f"gpu-check-{preset}")
    return folder


def service(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    from service.executor import PipelineCache
    from service.jobs import open_context, register_model, submit, tenant_id
    from service.runner import run_job
    from service.settings import Settings
    from service.specs import parse_spec

    rows = []
    options = {"precision": args.service_precision, "channels_last": True}
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.service_presets:
            if not budget.allows(f"service {preset}", 30):
                continue
            ctx = open_context(Settings.from_values(home=Path(tmp) / preset), embedded=True)
            name = f"gpu-check-{preset}"
            register_model(ctx, name, _weights_dir(preset, Path(tmp)))
            pipes = PipelineCache(device=args.device, batch_size=args.service_batch, **options)
            tenant = tenant_id(ctx)
            warm = {"kind": "sample", "count": args.service_batch, "model": name}
            run_job(ctx, submit(ctx, tenant, parse_spec(warm)).id, pipes)  # loads the model
            spec = {"kind": "sample", "count": args.service_items, "model": name,
                    "chunk_size": args.service_chunk}  # fmt: skip
            job = submit(ctx, tenant, parse_spec(spec))
            started = time.perf_counter()
            state = run_job(ctx, job.id, pipes)
            seconds = time.perf_counter() - started
            pipe = next(iter(pipes._pipes.values()))
            model_rate = _timed_rate(pipe, args.service_batch, args.runs, args.device)
            row = {
                "preset": preset, **options, "batch": args.service_batch,
                "items": args.service_items, "chunk_size": args.service_chunk, "state": state,
                "service_images_per_s": round(args.service_items / seconds, 1),
                "model_images_per_s": round(model_rate, 1),
                "efficiency": round(args.service_items / seconds / model_rate, 4),
                "encode_workers": ctx.settings.encode_workers or "cgroup quota",
            }  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def determinism(args: argparse.Namespace, budget: Budget) -> list[dict[str, Any]]:
    rows = []
    preset = args.presets[0]
    torch.manual_seed(0)
    model = DPIG(get_preset(preset))
    items = list(range(max(args.det_batches)))
    for precision in ("fp32", "bf16"):
        if not budget.allows(f"determinism {precision}", 10):
            continue
        hashes: dict[str, list[str]] = {}
        for batch in args.det_batches:
            pipe = _pipe(model, args.device, precision=precision, batch_size=batch)
            for attempt in (1, 2):
                pixels = to_uint8_batch(pipe.sample(items, seed=3))
                digests = [hashlib.sha256(p.tobytes()).hexdigest() for p in pixels]
                hashes[f"b{batch}#{attempt}"] = digests
        reference = hashes[f"b{args.det_batches[0]}#1"]
        row = {
            "preset": preset,
            "precision": precision,
            "batches": args.det_batches,
            "repeatable": all(hashes[f"b{b}#1"] == hashes[f"b{b}#2"] for b in args.det_batches),
            "same_across_batches": all(h == reference for h in hashes.values()),
            "items_differing": {
                k: sum(a != b for a, b in zip(h, reference, strict=True)) for k, h in hashes.items()
            },
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes (CI)")
    parser.add_argument("--budget-s", type=float, default=420.0)
    parser.add_argument("--presets", nargs="+", default=["market-small", "market", "deepfashion"])
    parser.add_argument("--batch", nargs="+", type=int, default=[64, 256])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--diff-items", type=int, default=256)
    parser.add_argument("--service-presets", nargs="+", default=["market-small", "market"])
    parser.add_argument("--service-items", type=int, default=16384)
    parser.add_argument("--service-chunk", type=int, default=4096)
    parser.add_argument("--service-batch", type=int, default=256)
    parser.add_argument("--service-precision", default="bf16")
    parser.add_argument("--det-batches", nargs="+", type=int, default=[1, 7, 64, 256])
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.device, args.compile_backend = "cuda", "inductor"
    if args.dry_run:
        args.device, args.presets, args.batch, args.runs = "cpu", ["tiny"], [4], 1
        # market-small: the bundled weights; tiny: saved random weights, as market's on a GPU
        args.diff_items, args.service_presets, args.service_items = 8, ["market-small", "tiny"], 16
        args.service_chunk, args.service_batch, args.det_batches = 8, 4, [1, 3, 4]
        args.budget_s = min(args.budget_s, 120.0)
        args.compile_backend = "eager"  # the torch.compile path without code generation
        torch.set_num_threads(1)
    elif not torch.cuda.is_available():
        parser.error("no CUDA device (use --dry-run on the CPU)")
    else:
        torch.backends.cudnn.benchmark = False  # determinism is one of the checks
    budget = Budget(args.budget_s)
    sections = {}
    for name, section in (
        ("throughput", throughput),
        ("bf16_vs_fp32", bf16_vs_fp32),
        ("service", service),
        ("determinism", determinism),
    ):
        print(f"# {name}", flush=True)
        sections[name] = section(args, budget)
    seconds = round(time.monotonic() - budget.started, 1)
    result = {
        "benchmark": "gpu_check",
        "dry_run": args.dry_run,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": {
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
        },
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "seconds": seconds,
        "skipped": budget.skipped,
        **sections,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    status = "dry-run" if args.dry_run else "ok"
    print(f"gpu_check={status} sections={len(sections)} skipped={len(budget.skipped)} "
          f"seconds={seconds}")  # fmt: skip


if __name__ == "__main__":
    main()
