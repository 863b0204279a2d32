"""Held-out figures of a Stage-I model on synthetic data, each beside its floor or ceiling.

Used by `dpig model evaluate` and logged during training (`stage1.eval_every`) for the learning
curve. Person and background regions are the renderer's true person masks, not limb masks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dpig_core.data.synth import FactorRecord
from dpig_core.metrics.evaluate import EvalData, _load, _region_change, _truth, _u8, load_eval_data
from dpig_core.metrics.masked import true_person_masks
from dpig_core.metrics.ssim import SSIM_VARIANTS
from dpig_core.models import DPIG
from dpig_core.pipeline import DPIGPipeline

__all__ = ["ground_truth_leakage", "heldout_figures", "leakage_ratio", "load_synthetic"]


def load_synthetic(root: str | Path, split: str = "test") -> EvalData:
    data = load_eval_data(root, split)
    if data.factors is None:
        raise ValueError(f"{root} has no factors.jsonl: held-out figures need synthetic data")
    return data


def leakage_ratio(before: torch.Tensor, after: torch.Tensor, masks: torch.Tensor) -> float:
    """Background swapped: mean change inside the person masks / mean change outside them
    (images [B, 3, H, W] in [−1, 1], masks [B, 1, H, W]); 0 = the person did not move at all."""
    inside, outside = _region_change(before, after, masks)
    return float(inside.mean() / outside.mean().clamp_min(1e-8))


def ground_truth_leakage(
    records: Sequence[FactorRecord], others: Sequence[FactorRecord], masks: torch.Tensor
) -> float:
    """`leakage_ratio` of the true renderings: each record, then it on the matching other
    record's background. This is the floor a perfect model reaches with these masks."""
    height, width = masks.shape[-2:]
    before = torch.stack([_truth(r, height, width) for r in records])
    pairs = zip(records, others, strict=True)
    after = torch.stack([_truth(r, height, width, background=o.background) for r, o in pairs])
    return leakage_ratio(before, after, masks)


def heldout_figures(model: DPIG, data: EvalData, images: int = 256) -> dict[str, Any]:
    """Reconstruction DPIG-SSIM and person/background L1 of `images` records (thinned evenly),
    with a noise-free perfect render's figures as ceilings, and the bg-swap leakage ratio with
    the ground truth's as its floor (one image per identity, person i on person i+1's background).
    """
    assert data.factors is not None
    device = next(model.parameters()).device
    pipe = DPIGPipeline(model, device=device)
    cfg = pipe.config
    step = max(len(data.records) / images, 1.0)
    records = [data.records[int(k * step)] for k in range(min(images, len(data.records)))]
    people, kept, real = _load(pipe, records)
    facts = [data.factors[records[k].name] for k in kept]
    masks = true_person_masks(facts, cfg.height, cfg.width)
    recon = pipe.render(people).float().cpu()
    real = real.float().cpu()
    perfect = torch.stack([_truth(f, cfg.height, cfg.width, noise=False) for f in facts])
    dpig_ssim = SSIM_VARIANTS["ssim_dpig"]
    person_l1, background_l1 = _region_change(real, recon, masks)
    perfect_person, perfect_background = _region_change(real, perfect, masks)

    firsts: dict[str, int] = {}
    for row, k in enumerate(kept):
        firsts.setdefault(records[k].identity, row)
    rows = list(firsts.values())
    other = rows[1:] + rows[:1]
    swapped = pipe.render(people.select(rows).mix(bg=people.select(other))).float().cpu()
    floor = ground_truth_leakage([facts[r] for r in rows], [facts[o] for o in other], masks[rows])
    return {
        "images": len(kept),
        "ssim_dpig": round(float(dpig_ssim(_u8(recon), _u8(real)).mean()), 4),
        "perfect_render_ssim_dpig": round(float(dpig_ssim(_u8(perfect), _u8(real)).mean()), 4),
        "person_l1": round(float(person_l1.mean()), 4),
        "perfect_render_person_l1": round(float(perfect_person.mean()), 4),
        "background_l1": round(float(background_l1.mean()), 4),
        "perfect_render_background_l1": round(float(perfect_background.mean()), 4),
        "swap_people": len(rows),
        "leakage_ratio": round(leakage_ratio(recon[rows], swapped, masks[rows]), 4),
        "ground_truth_leakage_ratio": round(floor, 4),
    }
