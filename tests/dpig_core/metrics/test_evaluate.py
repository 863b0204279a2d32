from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dpig_core.config import PRESETS
from dpig_core.data.records import PersonRecord
from dpig_core.metrics.evaluate import (
    SSIM_NOTES,
    EvalData,
    Extras,
    _truth,
    evaluate_sample,
    evaluate_swap,
    evaluate_transfer,
    image_scores,
    load_eval_data,
    transfer_pairs,
)
from dpig_core.models import DPIG
from dpig_core.pipeline import DPIGPipeline

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pipe() -> DPIGPipeline:
    torch.manual_seed(0)
    return DPIGPipeline(DPIG(PRESETS["tiny"]), batch_size=8)


@pytest.fixture(scope="module")
def data(tiny_market: Path) -> EvalData:
    return load_eval_data(tiny_market, "test")


def _record(identity: str, n: int) -> PersonRecord:
    return PersonRecord(Path(f"{identity}_{n}.jpg"), identity, "test")


def test_pairs_are_same_identity_ordered_sorted_and_thinned() -> None:
    records = [_record("a", 0), _record("a", 1), _record("a", 2), _record("b", 0), _record("b", 1)]
    pairs = transfer_pairs(records, 100)
    assert pairs == [(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (3, 4), (4, 3)]
    assert transfer_pairs(records, 4) == [(0, 1), (1, 0), (2, 0), (3, 4)]


def test_identical_images_score_perfectly() -> None:
    x = torch.randint(0, 256, (2, 3, 32, 16)).float()
    masks = torch.ones(2, 1, 32, 16)
    scores = image_scores(x, x, masks)
    assert set(scores) == set(SSIM_NOTES)
    for name in ("ssim_dpig", "ssim_patn", "ssim_gfla", "mask_ssim_dpig", "mask_ssim_patn"):
        assert torch.allclose(scores[name], torch.ones(2, dtype=torch.float64)), name
    assert torch.equal(scores["l1"], torch.zeros(2, dtype=torch.float64))


def test_true_rendering_reproduces_the_stored_image(data: EvalData) -> None:
    assert data.factors is not None
    record = data.records[0]
    stored = np.asarray(Image.open(record.path).convert("RGB"))
    truth = _truth(data.factors[record.name], 32, 16)
    # the dataset stores JPEGs, so compare within JPEG error
    assert np.abs(((truth.permute(1, 2, 0) + 1) * 127.5).numpy() - stored).mean() < 6


def test_transfer_report(pipe: DPIGPipeline, data: EvalData) -> None:
    report, sheet = evaluate_transfer(pipe, data, Extras(unavailable={"fid": "off"}), max_pairs=10)
    assert report["kind"] == "transfer" and report["protocol"]["pairs"] == 10
    for section in ("vs_target", "vs_true_rendering"):
        assert set(report[section]) == set(SSIM_NOTES)
        assert 0 <= report[section]["l1"] <= 1 and -1 <= report[section]["ssim_dpig"] <= 1
    assert report["pose_accuracy"] is None and report["unavailable"] == {"fid": "off"}
    assert set(SSIM_NOTES) <= set(report["metric_variants"])
    ceiling = report["perfect_render_vs_true_rendering"]  # an untrained model is far below it
    assert ceiling["ssim_dpig"] > report["vs_true_rendering"]["ssim_dpig"] + 0.2
    assert ceiling["l1"] < report["vs_true_rendering"]["l1"]
    assert sheet.dtype == np.uint8 and sheet.ndim == 3 and sheet.shape[2] == 3


def test_source_masks_change_only_the_mask_scores(pipe: DPIGPipeline, data: EvalData) -> None:
    target, _ = evaluate_transfer(pipe, data, Extras(), max_pairs=6)
    source, _ = evaluate_transfer(pipe, data, Extras(), max_pairs=6, mask_from="source")
    assert target["vs_target"]["ssim_dpig"] == source["vs_target"]["ssim_dpig"]
    assert target["vs_target"]["mask_ssim_dpig"] != source["vs_target"]["mask_ssim_dpig"]
    assert "source keypoints" in source["protocol"]["mask"]


def test_sample_report_explains_a_probe_of_the_wrong_size(
    pipe: DPIGPipeline, data: EvalData
) -> None:
    from dpig_core.metrics.pose_probe import PoseProbe, ProbeConfig

    probe = PoseProbe(ProbeConfig(height=64, width=32)).eval()
    report, sheet = evaluate_sample(pipe, data, Extras(probe=probe), count=4, identities=2,
                                    per_identity=3)  # fmt: skip
    assert report["protocol"]["samples"] == 4 and report["pose_accuracy"] is None
    assert "64x32" in report["unavailable"]["pose_accuracy"]
    assert sheet.shape[0] == 2 * (32 * 3 + 6) + 6  # 2 identity rows of 32-pixel tiles at scale 3


def test_sample_pose_accuracy_with_a_matching_probe(pipe: DPIGPipeline, data: EvalData) -> None:
    from dpig_core.metrics.pose_probe import PoseProbe, ProbeConfig

    probe = PoseProbe(ProbeConfig(height=32, width=16)).eval()
    report, _ = evaluate_sample(pipe, data, Extras(probe=probe), count=4)
    assert report["pose_accuracy"]["images"] == 4


def test_swap_report(pipe: DPIGPipeline, data: EvalData) -> None:
    report, _ = evaluate_swap(pipe, data, Extras(), people_count=3)
    assert report["protocol"]["people"] == 3
    assert set(report["leakage"]) == {"bg_resampled", "fg_resampled", "bg_swapped", "fg_swapped"}
    for scores in report["leakage"].values():
        assert scores["leakage_ratio"] >= 0
    assert set(report["vs_true_rendering"]) == {"bg_swapped", "fg_swapped", "reconstruction"}


def test_swap_report_gives_the_ground_truth_floor(pipe: DPIGPipeline, data: EvalData) -> None:
    report, _ = evaluate_swap(pipe, data, Extras(), people_count=3)
    assert "true person mask" in report["protocol"]["region"]
    for name in ("bg_swapped", "fg_swapped"):
        floor = report["leakage"][name]["ground_truth_leakage_ratio"]
        assert 0 <= floor < report["leakage"][name]["leakage_ratio"]
    assert "ground_truth_leakage_ratio" not in report["leakage"]["bg_resampled"]


def test_ground_truth_leakage_is_near_zero_only_with_true_masks(tmp_path: Path) -> None:
    """Limb masks of radius 4 at 64×32 are about 35% background, so the ground truth itself
    'leaks' on them; the renderer's true masks put it near its floor of 0."""
    from dpig_core.data.synth import write_market_dataset
    from dpig_core.metrics.heldout import ground_truth_leakage
    from dpig_core.metrics.masked import person_masks, true_person_masks

    write_market_dataset(tmp_path, identities=12, per_identity=2, height=64, width=32, seed=11,
                         test_fraction=1.0, progress=False)  # fmt: skip
    held = load_eval_data(tmp_path, "test")
    assert held.factors is not None
    firsts = {r.identity: held.factors[r.name] for r in reversed(held.records)}
    facts = list(firsts.values())
    others = facts[1:] + facts[:1]
    true = ground_truth_leakage(facts, others, true_person_masks(facts, 64, 32))
    limb = ground_truth_leakage(facts, others, person_masks([f.pose for f in facts], 64, 32, 4))
    assert true < 0.1
    assert limb > 0.2


def test_transfer_scores_the_probe_on_the_true_renderings(
    pipe: DPIGPipeline, data: EvalData
) -> None:
    from dpig_core.metrics.pose_probe import PoseProbe, ProbeConfig

    probe = PoseProbe(ProbeConfig(height=32, width=16)).eval()
    report, _ = evaluate_transfer(pipe, data, Extras(probe=probe), max_pairs=4)
    assert report["pose_accuracy"]["images"] == 4
    assert report["true_rendering_pose_accuracy"]["images"] == 4
