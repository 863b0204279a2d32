"""Encode once vs encode per item: a pose grid of S sources × P poses with one DPIGPipeline.

(a) "encode once" (what the service's pose-grid executor does): `encode` the S sources, then
`transfer` them into the P poses (S·P decoder rows, S encoder rows). (b) "naive": every
(source, pose) item encodes its source again (S·P encoder rows) and is rendered in its pose. Both
run the decoder on the same rows in the same micro-batches, so their images must be identical.

    python bench/encode_once.py --sources 16 --poses 16
Last line: encode_once_speedup=<naive time / encode-once time>.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from dpig_core.config import get_preset
from dpig_core.models import DPIG
from dpig_core.pipeline import DPIGPipeline

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "encode_once.json"
BUNDLED = ROOT / "models" / "dpig-market-small-synth"


def _people(pipe: DPIGPipeline, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` synthetic people (images in [−1, 1], in-frame keypoints) from sampled factors."""
    factors = pipe.sample_factors(list(range(count)), seed)
    return pipe.render(factors).clamp(-1, 1), factors.rcv


def encode_once(
    pipe: DPIGPipeline, images: torch.Tensor, rcv: torch.Tensor, poses: torch.Tensor
) -> torch.Tensor:
    sources = pipe.encode(images, rcv)
    out = pipe.transfer(sources, poses)
    return out.reshape(-1, *out.shape[2:])


def naive(
    pipe: DPIGPipeline, images: torch.Tensor, rcv: torch.Tensor, poses: torch.Tensor
) -> torch.Tensor:
    s, p = images.shape[0], poses.shape[0]
    src = torch.arange(s).repeat_interleave(p)  # item k = (source k // P, pose k % P)
    factors = pipe.encode(images[src], rcv[src])  # each item encodes its source again
    return pipe.render(replace(factors, rcv=poses.repeat(s, 1, 1).float(), pose=None))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sources", type=int, default=16)
    parser.add_argument("--poses", type=int, default=16)
    parser.add_argument("--preset", default="market-small")
    parser.add_argument("--model", default=str(BUNDLED), help="weights folder ('' = random)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.model:
        pipe = DPIGPipeline.from_pretrained(args.model, batch_size=args.batch)
        weights = str(args.model)
    else:
        pipe = DPIGPipeline(DPIG(get_preset(args.preset)), batch_size=args.batch)
        weights = f"random {args.preset}"
    images, rcv = _people(pipe, args.sources, seed=1)
    poses = pipe.sample_factors(list(range(args.poses)), seed=2).rcv
    n = args.sources * args.poses
    results, outputs = {}, {}
    for name, fn in (("encode_once", encode_once), ("naive", naive)):
        fn(pipe, images[:1], rcv[:1], poses[:1])  # warm-up
        times = []
        for _ in range(args.runs):
            started = time.perf_counter()
            outputs[name] = fn(pipe, images, rcv, poses)
            times.append(time.perf_counter() - started)
        median = statistics.median(times)
        results[name] = {"median_s": round(median, 4), "images_per_s": round(n / median, 2)}
        print(json.dumps({"way": name, **results[name]}))
    identical = bool(torch.equal(outputs["encode_once"], outputs["naive"]))
    speedup = results["naive"]["median_s"] / results["encode_once"]["median_s"]
    report = {
        "machine": {
            "device": "cpu",
            "threads": args.threads,
            "cpu_count": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "torch": torch.__version__,
        },
        "weights": weights,
        "config": getattr(pipe.config, "name", args.preset),
        "sources": args.sources,
        "poses": args.poses,
        "images": n,
        "batch_size": args.batch,
        "runs": args.runs,
        **results,
        "identical": identical,
        "speedup": round(speedup, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"identical={identical}")
    if not identical:
        raise SystemExit("encode-once and naive images differ")
    print(f"encode_once_speedup={speedup:.2f}")


if __name__ == "__main__":
    main()
