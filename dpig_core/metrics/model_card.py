"""The quality figures of a model card: Stage-I reconstruction on held-out identities and FID of
people sampled through Φ, with real-vs-real and real-vs-noise FID for scale."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from dpig_core.data.dataset import PersonDataset, in_order_batches
from dpig_core.data.records import PersonRecord
from dpig_core.generate import sample_people
from dpig_core.metrics.fid import InceptionFeatures, Statistics, frechet_distance, statistics
from dpig_core.metrics.ssim import SSIM_VARIANTS, l1, psnr
from dpig_core.models import DPIG
from dpig_core.train.stage1 import reconstruct

SSIM_NOTES = {
    "ssim_dpig": "DPIG score.py: grayscale, uniform window 7, data_range of the target",
    "ssim_patn": "PATN/Def-GAN: RGB, Gaussian sigma 1.5, population covariance",
    "ssim_gfla": "GFLA/PIDM: RGB in [0,1], uniform window 51 (shrunk to fit), data_range 1",
}


def _to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [−1, 1] → uint8-valued float, as a saved PNG would read back."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


@torch.inference_mode()
def reconstruction_quality(
    model: DPIG, records: Sequence[PersonRecord], batch_size: int = 64
) -> dict[str, Any]:
    """Mean SSIM (three variants), PSNR and L1 of x̂ against x over `records`."""
    dataset = PersonDataset(records, model.config)
    sums: dict[str, float] = {}
    count = 0
    for batch in in_order_batches(dataset, batch_size):
        target = _to_uint8(batch["image"])
        generated = _to_uint8(reconstruct(model, batch))
        scores = {name: fn(generated, target) for name, fn in SSIM_VARIANTS.items()}
        scores |= {"psnr_db": psnr(generated, target), "l1": l1(generated, target)}
        for name, values in scores.items():
            sums[name] = sums.get(name, 0.0) + float(values.sum())
        count += len(target)
    return {
        "images": count,
        **{name: round(total / count, 4) for name, total in sums.items()},
        "ssim_variants": SSIM_NOTES,
    }


def _real_images(records: Sequence[PersonRecord], model: DPIG) -> Iterator[torch.Tensor]:
    dataset = PersonDataset(records, model.config)
    for batch in in_order_batches(dataset, 100):
        yield _to_uint8(batch["image"])


@torch.inference_mode()
def sampling_fid(
    model: DPIG,
    real_a: Sequence[PersonRecord],
    real_b: Sequence[PersonRecord],
    *,
    count: int = 1000,
    seed: int = 0,
    extractor: InceptionFeatures | None = None,
) -> dict[str, Any]:
    """FID(Φ samples, real A), FID(real B, real A) and FID(uniform noise, real A)."""
    extractor = extractor or InceptionFeatures()
    real = statistics(_real_images(real_a[:count], model), extractor, {"images": "real A"})
    gen = torch.Generator().manual_seed(seed)

    def sampled() -> Iterator[torch.Tensor]:
        for start in range(0, count, 100):
            yield _to_uint8(sample_people(model, min(100, count - start), gen))

    def noise() -> Iterator[torch.Tensor]:
        cfg = model.config
        for start in range(0, count, 100):
            n = min(100, count - start)
            yield torch.randint(0, 256, (n, 3, cfg.height, cfg.width), generator=gen).float()

    def fid(images: Iterator[torch.Tensor]) -> tuple[float, Statistics]:
        stats = statistics(images, extractor)
        return round(frechet_distance(stats, real), 2), stats

    samples_fid, s = fid(sampled())
    real_fid, r = fid(_real_images(real_b[:count], model))
    noise_fid, _ = fid(noise())
    return {
        "fid_samples_vs_real": samples_fid,
        "fid_real_vs_real": real_fid,
        "fid_noise_vs_real": noise_fid,
        "images_per_set": min(count, real.count, s.count, r.count),
        "fid_variant": "fid-helper Inception (TF 2015-12-05 weights), nv-bilinear float resize 299",
    }


def environment() -> dict[str, Any]:
    return {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor() or "unknown",
        "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
