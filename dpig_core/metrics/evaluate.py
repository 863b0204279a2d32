"""The three evaluation protocols behind `dpig eval`: pose transfer, sampling and factor swaps.

Each returns a JSON-ready report and a contact sheet. File lists are sorted, every report names
its metric variants, and metrics whose weights are missing say why instead of a number.
On synthetic data (a `factors.jsonl` beside the images) the reports add disentanglement scores
against the true rendering of the requested factors.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from dpig_core.data.dataset import image_to_tensor
from dpig_core.data.records import PersonRecord
from dpig_core.data.synth import FactorRecord, read_factors, rerender
from dpig_core.imaging import UInt8Image, contact_sheet, skeleton, to_uint8
from dpig_core.metrics.fid import InceptionFeatures, Statistics, frechet_distance, statistics
from dpig_core.metrics.masked import mask_ssim, person_masks
from dpig_core.metrics.ssim import SSIM_VARIANTS, l1, psnr
from dpig_core.pipeline import DPIGPipeline, Factors, item_noise
from dpig_core.pose import PoseError

log = logging.getLogger(__name__)

SSIM_NOTES = {
    "ssim_dpig": "DPIG score.py: grayscale, uniform window 7, data_range of the target",
    "ssim_patn": "PATN/Def-GAN: RGB, Gaussian sigma 1.5, population covariance",
    "ssim_gfla": "GFLA/PIDM: RGB in [0,1], uniform window 51 (shrunk to fit), data_range 1",
    "mask_ssim_dpig": "DPIG score_mask.py: both images × mask, uint8, RGB, uniform window 7, "
    "data_range 255",
    "mask_ssim_patn": "both images × mask, uint8, then ssim_patn",
    "psnr_db": "on uint8 RGB",
    "l1": "mean |generated − target| in [0, 1] units",
}
PROBE_NOTE = (
    "keypoints of the generated images estimated by the pose probe (a CNN trained on synthetic "
    "people) and compared with the requested pose: mean distance and PCK at 0.1/0.05 × height"
)


@dataclass
class Extras:
    """Optional metric back-ends; each is None when its weights were not supplied, with the
    reason in `unavailable`."""

    fid: InceptionFeatures | None = None
    inception: Any = None  # InceptionV3ForIS
    lpips: Any = None  # LPIPSAlex
    probe: Any = None  # PoseProbe
    unavailable: dict[str, str] = field(default_factory=dict)
    fid_cache: Path | None = None


@dataclass
class EvalData:
    """Records of one split (sorted by path) and, for synthetic datasets, their true factors."""

    root: Path
    split: str
    records: list[PersonRecord]
    factors: dict[str, FactorRecord] | None

    @property
    def synthetic(self) -> bool:
        return self.factors is not None


def load_eval_data(root: str | Path, split: str = "test") -> EvalData:
    """A dataset's `split` (all records when the dataset has no such split), keypoints required."""
    from dpig_core.data.readers import read_dataset

    index = read_dataset(root)
    records = index.split(split) or index.records
    records = sorted((r for r in records if r.rcv is not None), key=lambda r: str(r.path))
    if not records:
        raise ValueError(f"{root}: no images with keypoints")
    factors = read_factors(root) if (Path(root) / "factors.jsonl").is_file() else None
    return EvalData(Path(root), split, records, factors)


# ------------------------------------------------------------------------------------------------
# helpers


def _u8(x: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [−1, 1] → uint8-valued float, as a saved PNG reads back."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round()


def _load(pipe: DPIGPipeline, records: Sequence[PersonRecord]) -> tuple[Factors, list[int], Any]:
    """Load and encode the readable records: (factors, kept positions, images [N, 3, H, W])."""
    images, poses, kept = [], [], []
    for i, record in enumerate(records):
        try:
            img, rcv = pipe.load_people([(record.path, record.rcv)])
        except (OSError, PoseError, ValueError) as exc:
            log.warning("skipping %s: %s", record.path, exc)
            continue
        images.append(img)
        poses.append(rcv)
        kept.append(i)
    if not kept:
        raise ValueError("none of the images could be read")
    x, rcv = torch.cat(images), torch.cat(poses)
    return pipe.encode(x, rcv), kept, x


def _truth(
    record: FactorRecord, height: int, width: int, noise: bool = True, **replace: Any
) -> torch.Tensor:
    """The true rendering of a synthetic record with factors replaced, in the model's frame:
    [3, H, W] in [−1, 1]."""
    pixels = rerender(record, noise=noise, **replace)
    if pixels.shape[:2] != (height, width):
        resized = Image.fromarray(pixels).resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized)
    return image_to_tensor(pixels)


class _Means:
    """Running means of per-image score tensors."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def add(self, scores: dict[str, torch.Tensor]) -> None:
        for name, values in scores.items():
            self.sums[name] = self.sums.get(name, 0.0) + float(values.double().sum())
        self.count += len(next(iter(scores.values())))

    def result(self) -> dict[str, float]:
        return {k: round(v / max(self.count, 1), 4) for k, v in self.sums.items()}


def image_scores(
    generated: torch.Tensor, target: torch.Tensor, masks: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-image SSIM (three variants), mask-SSIM (two), PSNR and L1 of uint8-valued images
    [B, 3, H, W] with masks [B, 1, H, W]."""
    scores = {name: fn(generated, target) for name, fn in SSIM_VARIANTS.items()}
    scores["mask_ssim_dpig"] = mask_ssim(generated, target, masks, variant="dpig")
    scores["mask_ssim_patn"] = mask_ssim(generated, target, masks, variant="patn")
    scores["psnr_db"] = psnr(generated, target)
    scores["l1"] = l1(generated, target)
    return scores


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _fid(extras: Extras, generated: Sequence[torch.Tensor], real: Statistics | None) -> Any:
    if extras.fid is None or real is None:
        return None
    gen = statistics(iter(generated), extras.fid)
    return round(frechet_distance(gen, real), 2)


def real_statistics(
    extras: Extras, data: EvalData, pipe: DPIGPipeline, limit: int = 2000
) -> Statistics | None:
    """Inception statistics of the dataset's real images at the model's resolution, cached under
    `extras.fid_cache` by a key of the sorted file list, the resolution and the extractor."""
    if extras.fid is None:
        return None
    import hashlib
    import json

    cfg = pipe.config
    records = data.records[:limit]
    meta = {
        "images": len(records),
        "root": str(data.root),
        "split": data.split,
        "files_sha256": hashlib.sha256(
            "\n".join(f"{r.path.name}:{r.path.stat().st_size}" for r in records).encode()
        ).hexdigest(),
        "resolution": f"{cfg.height}x{cfg.width}",
        "resize_to_model": "PIL bilinear",
        "format": "uint8 RGB as read from disk",
    }
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:16]
    path = extras.fid_cache / f"real-{key}.npz" if extras.fid_cache else None
    if path is not None and path.is_file():
        return Statistics.load(path)

    def batches() -> Iterator[torch.Tensor]:
        for part in _chunks(len(records), 100):
            x, _ = pipe.load_people([(r.path, r.rcv) for r in records[part]])
            yield _u8(x)

    stats = statistics(batches(), extras.fid, meta)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        stats.save(path)
    return stats


def _pose_accuracy(extras: Extras, generated: torch.Tensor, requested: torch.Tensor) -> Any:
    if extras.probe is None:
        return None
    from dpig_core.metrics.pose_probe import estimate, pose_error

    cfg = extras.probe.config
    if tuple(generated.shape[-2:]) != (cfg.height, cfg.width):
        extras.unavailable["pose_accuracy"] = (
            f"the pose probe reads {cfg.height}x{cfg.width} images, the model makes "
            f"{generated.shape[-2]}x{generated.shape[-1]}"
        )
        return None
    scores = pose_error(estimate(extras.probe, generated), requested, generated.shape[-2])
    return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in scores.items()}


def _header(pipe: DPIGPipeline, data: EvalData, kind: str) -> dict[str, Any]:
    return {
        "kind": kind,
        "model": pipe.config.name,
        "data": {
            "root": str(data.root),
            "split": data.split,
            "images": len(data.records),
            "synthetic_ground_truth": data.synthetic,
        },
        "device": str(pipe.device),
        "precision": pipe.precision,
    }


def _finish(report: dict[str, Any], extras: Extras, started: float) -> dict[str, Any]:
    report["metric_variants"] = {
        **SSIM_NOTES,
        "pose_accuracy": PROBE_NOTE,
        "fid": "fid-helper Inception (TF 2015-12-05 weights), nv-bilinear float resize to 299",
    }
    report["unavailable"] = dict(sorted(extras.unavailable.items()))
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _tiles(images: torch.Tensor) -> list[UInt8Image]:
    return [to_uint8(x) for x in images]


# ------------------------------------------------------------------------------------------------
# pose transfer


def transfer_pairs(records: Sequence[PersonRecord], limit: int) -> list[tuple[int, int]]:
    """(source, target) positions of every ordered pair of different images of one identity,
    in sorted order, thinned evenly to at most `limit`."""
    by_id: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_id.setdefault(r.identity, []).append(i)
    pairs = [(s, t) for ids in by_id.values() for s in ids for t in ids if s != t]
    pairs.sort()
    if len(pairs) > limit:
        step = len(pairs) / limit
        pairs = [pairs[int(k * step)] for k in range(limit)]
    return pairs


def evaluate_transfer(
    pipe: DPIGPipeline,
    data: EvalData,
    extras: Extras,
    *,
    max_pairs: int = 1000,
    mask_from: str = "target",
    sheet_size: int = 6,
) -> tuple[dict[str, Any], UInt8Image]:
    """Pose transfer between images of one identity: each source (encoded once) in the target's
    pose, scored against the target image; on synthetic data also against the true rendering of
    the source person in the target pose on the source's background (what DPIG is asked to make:
    it keeps the condition image's background), beside the ceiling: a noise-free render of that
    truth scored the same way."""
    started = time.perf_counter()
    cfg = pipe.config
    pairs = transfer_pairs(data.records, max_pairs)
    if not pairs:
        raise ValueError("pose transfer needs identities with at least two images")
    used = sorted({i for pair in pairs for i in pair})
    people, kept, real = _load(pipe, [data.records[i] for i in used])
    pos = {used[k]: row for row, k in enumerate(kept)}
    pairs = [(s, t) for s, t in pairs if s in pos and t in pos]
    src_rows = torch.tensor([pos[s] for s, _ in pairs])
    tgt_rows = torch.tensor([pos[t] for _, t in pairs])
    radius = None if mask_from == "target" else max(1, round(7 * cfg.height / 128))
    vs_target, vs_truth, ceiling = _Means(), _Means(), _Means()
    generated_all, targets_all, truths_all = [], [], []
    for part in _chunks(len(pairs), 256):
        sources, targets = src_rows[part].tolist(), tgt_rows[part].tolist()
        # pose j of this call is the target of pair j
        gen = pipe.transfer(
            people, people.rcv[targets], pairs=[(s, j) for j, s in enumerate(sources)]
        )
        mask_rcv = people.rcv[tgt_rows[part] if mask_from == "target" else src_rows[part]]
        masks = person_masks(mask_rcv, cfg.height, cfg.width, radius)
        g8, t8 = _u8(gen), _u8(real[tgt_rows[part]])
        vs_target.add(image_scores(g8, t8, masks))
        generated_all.append(g8)
        targets_all.append(t8)
        if data.factors is not None:
            facts = [data.factors[data.records[used[k]].name] for k in kept]
            # both records come from one dataset, so the target's pose is in the source's frame
            truth = [
                _truth(facts[s], cfg.height, cfg.width, pose=facts[t].pose)
                for s, t in zip(sources, targets, strict=True)
            ]
            perfect = [
                _truth(facts[s], cfg.height, cfg.width, noise=False, pose=facts[t].pose)
                for s, t in zip(sources, targets, strict=True)
            ]
            truth8 = _u8(torch.stack(truth))
            truths_all.append(truth8)
            vs_truth.add(image_scores(g8, truth8, masks))
            ceiling.add(image_scores(_u8(torch.stack(perfect)), truth8, masks))
    generated = torch.cat(generated_all)
    report = _header(pipe, data, "transfer")
    report["protocol"] = {
        "pairs": len(pairs),
        "sources_encoded": len(kept),
        "pairing": "every ordered pair of different images of one identity, sorted, thinned evenly",
        "mask": f"limb mask of the {mask_from} keypoints, radius "
        f"{radius or 'PATN 4 at 128x64, scaled'}, 5x5 closing",
    }
    report["vs_target"] = vs_target.result()
    if data.factors is not None:
        report["vs_true_rendering"] = vs_truth.result()
        # a noise-free render of the right answer: the best any model can score
        report["perfect_render_vs_true_rendering"] = ceiling.result()
    report["pose_accuracy"] = _pose_accuracy(extras, generated / 127.5 - 1, people.rcv[tgt_rows])
    if truths_all:  # the probe on the right answers: the ceiling of pose_accuracy
        report["true_rendering_pose_accuracy"] = _pose_accuracy(
            extras, torch.cat(truths_all) / 127.5 - 1, people.rcv[tgt_rows]
        )
    report["fid_vs_targets"] = _fid(
        extras,
        list(torch.split(generated, 100)),
        statistics(iter(torch.split(torch.cat(targets_all), 100)), extras.fid)
        if extras.fid is not None
        else None,
    )
    if extras.lpips is not None:
        from dpig_core.metrics.lpips import lpips

        report["lpips_vs_target"] = round(
            float(
                lpips(
                    generated / 127.5 - 1, torch.cat(targets_all) / 127.5 - 1, extras.lpips
                ).mean()
            ),
            4,
        )
    if extras.inception is not None:
        from dpig_core.metrics.inception_score import inception_score

        mean, std = inception_score(iter(torch.split(generated, 100)), extras.inception)
        report["inception_score"] = {"mean": round(mean, 3), "std": round(std, 3)}

    # sheet: rows = sources (one per identity), columns = the source, then it in each pose
    firsts: dict[str, int] = {}
    for row, k in enumerate(kept):
        firsts.setdefault(data.records[used[k]].identity, row)
    rows_idx = list(firsts.values())[:sheet_size]
    pose_idx = list(firsts.values())[-sheet_size:][::-1]
    grid = pipe.transfer(people.select(rows_idx), people.rcv[pose_idx])
    header: list[UInt8Image | None] = [None]
    header += [skeleton(people.rcv[j].numpy(), cfg.height, cfg.width) for j in pose_idx]
    rows = [header] + [[to_uint8(real[i]), *_tiles(grid[r])] for r, i in enumerate(rows_idx)]
    return _finish(report, extras, started), contact_sheet(rows, scale=3)


# ------------------------------------------------------------------------------------------------
# sampling


def evaluate_sample(
    pipe: DPIGPipeline,
    data: EvalData,
    extras: Extras,
    *,
    count: int = 1000,
    seed: int = 0,
    identities: int = 6,
    per_identity: int = 8,
) -> tuple[dict[str, Any], UInt8Image]:
    """New people with every factor sampled through Φ: FID against the real split, Inception
    Score when its weights are given, and how far the people stand from the sampled pose."""
    started = time.perf_counter()
    generated, requested = [], []
    for part in _chunks(count, 256):
        f = pipe.sample_factors(list(range(part.start, part.stop)), seed)
        generated.append(pipe.render(f))
        requested.append(f.rcv)
    images = torch.cat(generated)
    u8 = _u8(images)
    report = _header(pipe, data, "sample")
    report["protocol"] = {
        "samples": count,
        "seed": seed,
        "noise": "z ~ N(0, 0.2^2) per factor; pose decodes Phi_pose(z)",
    }
    report["fid_vs_real"] = _fid(
        extras, list(torch.split(u8, 100)), real_statistics(extras, data, pipe, limit=count)
    )
    report["pose_accuracy"] = _pose_accuracy(extras, images, torch.cat(requested))
    if extras.inception is not None:
        from dpig_core.metrics.inception_score import inception_score

        mean, std = inception_score(iter(torch.split(u8, 100)), extras.inception)
        report["inception_score"] = {"mean": round(mean, 3), "std": round(std, 3)}
    # sheet: the Virtual Market layout, one synthetic identity per row
    vm = pipe.sample(list(range(identities * per_identity)), seed, per_identity=per_identity)
    rows = [_tiles(vm[i * per_identity : (i + 1) * per_identity]) for i in range(identities)]
    return _finish(report, extras, started), contact_sheet(rows, scale=3)


# ------------------------------------------------------------------------------------------------
# swaps and disentanglement


def _region_change(
    before: torch.Tensor, after: torch.Tensor, masks: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean |after − before| in [0, 1] units inside and outside the masks, per image."""
    diff = ((after - before).abs() / 2).mean(dim=1, keepdim=True)  # [−1, 1] → [0, 1] units
    inside = (diff * masks).flatten(1).sum(1) / masks.flatten(1).sum(1).clamp_min(1)
    outside = (diff * (1 - masks)).flatten(1).sum(1) / (1 - masks).flatten(1).sum(1).clamp_min(1)
    return inside, outside


def evaluate_swap(
    pipe: DPIGPipeline,
    data: EvalData,
    extras: Extras,
    *,
    people_count: int = 64,
    seed: int = 0,
    sheet_size: int = 6,
) -> tuple[dict[str, Any], UInt8Image]:
    """Disentanglement of foreground and background.

    Leakage: re-sample only the background through Φ (or swap it for another person's) and
    measure how much the person region changes, against how much the background region changes;
    then the reverse for the foreground. The person region is the renderer's true person mask on
    synthetic data (for a foreground swap, the union of both people's masks) and the model's limb
    mask of the pose elsewhere. On synthetic data each swap's `leakage_ratio` has the ground
    truth's beside it (`ground_truth_leakage_ratio`, its floor), and a swapped image is also
    scored against the true rendering of the swapped factors (person i on person j's background;
    person j's appearance in person i's pose and background).
    """
    from dataclasses import replace

    from dpig_core.metrics.masked import true_person_masks

    started = time.perf_counter()
    cfg = pipe.config
    if not cfg.has_bg:
        raise ValueError(f"model {cfg.name!r} has no background code to swap")
    # one image per identity first, so that swaps exchange different people
    firsts: dict[str, PersonRecord] = {}
    for r in data.records:
        firsts.setdefault(r.identity, r)
    chosen = list(firsts.values())[:people_count]
    people, kept, _ = _load(pipe, chosen)
    chosen = [chosen[k] for k in kept]
    n = len(people)
    if n < 2:
        raise ValueError("swaps need at least two people")
    other = [(i + 1) % n for i in range(n)]
    facts = [data.factors[r.name] for r in chosen] if data.factors is not None else None
    regions: dict[str, torch.Tensor] = {}
    truths: dict[str, list[torch.Tensor]] = {}
    if facts is not None:
        swapped_people = [
            replace(f, identity=facts[j].identity) for f, j in zip(facts, other, strict=True)
        ]
        masks = true_person_masks(facts, cfg.height, cfg.width)
        union = torch.maximum(masks, true_person_masks(swapped_people, cfg.height, cfg.width))
        regions = {"bg": masks, "fg": union}
        truths = {
            "reconstruction": [_truth(f, cfg.height, cfg.width) for f in facts],
            "bg_swapped": [
                _truth(f, cfg.height, cfg.width, background=facts[j].background)
                for f, j in zip(facts, other, strict=True)
            ],
            "fg_swapped": [_truth(f, cfg.height, cfg.width) for f in swapped_people],
        }
        region_note = "the renderer's true person mask (fg swaps: union of both people's)"
    else:
        masks = person_masks(people.rcv, cfg.height, cfg.width, cfg.mask_radius)
        regions = {"bg": masks, "fg": masks}
        region_note = f"limb mask of each person's pose, radius {cfg.mask_radius}, 5x5 closing"
    base = pipe.render(people)
    items = list(range(n))
    z_bg = pipe.map_noise("bg", item_noise(seed, items, "bg", cfg.bg_dim))
    z_fg = pipe.map_noise("fg", item_noise(seed, items, "fg", cfg.fg_dim))
    variants = {
        "bg_resampled": people.mix(bg=Factors(people.fg, z_bg, people.rcv)),
        "fg_resampled": people.mix(fg=Factors(z_fg, people.bg, people.rcv)),
        "bg_swapped": people.mix(bg=people.select(other)),
        "fg_swapped": people.mix(fg=people.select(other)),
    }

    def ratio(before: torch.Tensor, after: torch.Tensor, factor: str) -> float:
        inside, outside = _region_change(before, after, regions[factor])
        changed, kept_region = (outside, inside) if factor == "bg" else (inside, outside)
        return float(kept_region.mean() / changed.mean().clamp_min(1e-8))

    leakage: dict[str, Any] = {}
    rendered: dict[str, torch.Tensor] = {}
    for name, factors in variants.items():
        factor = name[:2]
        rendered[name] = after = pipe.render(factors)
        inside, outside = _region_change(base, after, regions[factor])
        leakage[name] = {
            "person_region_change": round(float(inside.mean()), 4),
            "background_region_change": round(float(outside.mean()), 4),
            "leakage_ratio": round(ratio(base, after, factor), 4),
        }
        if name in truths:
            before_t, after_t = torch.stack(truths["reconstruction"]), torch.stack(truths[name])
            leakage[name]["ground_truth_leakage_ratio"] = round(ratio(before_t, after_t, factor), 4)
    report = _header(pipe, data, "swap")
    report["protocol"] = {
        "people": n,
        "pairing": "person i takes the factor of person (i + 1) mod n; one image per identity",
        "region": region_note,
        "leakage_ratio": "change in the region that should stay / change in the region that "
        "should change (0 = perfectly disentangled); ground_truth_leakage_ratio: the same for "
        "the true renderings, the floor a perfect model reaches",
    }
    report["leakage"] = leakage
    if truths:
        truth_scores: dict[str, Any] = {}
        rendered["reconstruction"] = base
        for name, truth in truths.items():
            means = _Means()
            means.add(image_scores(_u8(rendered[name]), _u8(torch.stack(truth)), masks))
            truth_scores[name] = means.result()
        report["vs_true_rendering"] = truth_scores
    # sheet: rows = a person (its foreground and pose), columns = the background of each person
    k = min(sheet_size, n)
    rows: list[list[UInt8Image | None]] = [[None, *_tiles(base[:k])]]
    for i in range(k):
        grid = pipe.render(people.select([i] * k).mix(bg=people.select(list(range(k)))))
        rows.append([to_uint8(base[i]), *_tiles(grid)])
    return _finish(report, extras, started), contact_sheet(rows, scale=3)
