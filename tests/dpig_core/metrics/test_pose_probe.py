from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from dpig_core.metrics.pose_probe import (
    DEFAULT_PROBE,
    FLIP_ORDER,
    PROBE_JSON,
    PROBE_WEIGHTS,
    PoseProbe,
    ProbeConfig,
    ProbeError,
    decode_heatmaps,
    estimate,
    evaluate_on_synthetic,
    flip_horizontal,
    gaussian_blur,
    heatmap_targets,
    load_probe,
    parameter_count,
    pose_error,
    render_synthetic,
    save_probe,
    train_pose_probe,
)
from dpig_core.pose import KEYPOINT_NAMES

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = ProbeConfig(height=32, width=16, channels=16)
# The bundled probe measured, on the 64 held-out images of the last test: PCK@0.1 0.978, mean
# error 1.08 px (clean); 0.968, 1.29 px (blurred, σ = 1). The floors leave a margin for other
# CPUs' numerics, not for a worse probe.
PCK_FLOOR = 0.94
MEAN_PX_CEILING = 1.5
BLURRED_PCK_FLOOR = 0.92
BLURRED_MEAN_PX_CEILING = 1.8


def _probe(config: ProbeConfig = SMALL, seed: int = 0) -> PoseProbe:
    torch.manual_seed(seed)
    return PoseProbe(config).eval()


# --------------------------------------------------------------------------------------------------
# Network, decoding, data


@pytest.mark.parametrize("config", [SMALL, ProbeConfig()])
def test_shapes_and_size(config: ProbeConfig) -> None:
    probe = _probe(config)
    images = torch.rand(3, 3, config.height, config.width) * 2 - 1
    heat, vis = probe(images)
    assert heat.shape == (3, 18, config.height // 2, config.width // 2)
    assert vis.shape == (3, 18)
    rcv = estimate(probe, images)
    assert rcv.shape == (3, 18, 3) and rcv.dtype == torch.float32
    visible = rcv[..., 2] > 0
    assert set(rcv[..., 2].unique().tolist()) <= {0.0, 1.0}
    assert (rcv[~visible] == 0).all()
    assert (rcv[..., 0] >= 0).all() and (rcv[..., 0] < config.height).all()
    assert (rcv[..., 1] >= 0).all() and (rcv[..., 1] < config.width).all()
    assert parameter_count(probe) <= 1_000_000


def test_estimate_rejects_other_sizes_and_handles_empty() -> None:
    probe = _probe()
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 16\]"):
        estimate(probe, torch.zeros(1, 3, 64, 32))
    assert estimate(probe, torch.zeros(0, 3, 32, 16)).shape == (0, 18, 3)


def test_config_json_round_trip_and_validation() -> None:
    config = ProbeConfig(height=48, width=24, channels=16, sigma=1.5)
    assert ProbeConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="multiples of 4"):
        ProbeConfig(height=30, width=16)


def test_decoding_a_target_heatmap_recovers_the_keypoint() -> None:
    config = ProbeConfig(height=64, width=32)
    rcv = torch.zeros(1, 18, 3)
    rcv[0, :, 0] = torch.linspace(5.25, 58.5, 18)
    rcv[0, :, 1] = torch.linspace(4.0, 27.75, 18)
    rcv[0, :, 2] = 1
    target = heatmap_targets(rcv, config)
    assert target.sum(dim=(2, 3)) == pytest.approx(torch.ones(1, 18))
    decoded = decode_heatmaps(torch.log(target.clamp_min(1e-30)))
    # The window around the peak truncates the Gaussian's tails: a small bias, well under 0.2 px.
    assert torch.allclose(decoded, rcv[..., :2], atol=0.2)


def test_invisible_keypoints_get_no_target() -> None:
    rcv = torch.zeros(2, 18, 3)
    rcv[0, 3] = torch.tensor([10.0, 8.0, 1.0])
    target = heatmap_targets(rcv, SMALL)
    assert target[0, 3].sum() == pytest.approx(1.0)
    assert target.sum() == pytest.approx(1.0)


def test_render_synthetic_is_seeded_and_in_range() -> None:
    a, pa = render_synthetic(np.random.default_rng(5), 2, 32, 16)
    b, pb = render_synthetic(np.random.default_rng(5), 2, 32, 16)
    assert a.shape == (2, 3, 32, 16) and pa.shape == (2, 18, 3)
    assert torch.equal(a, b) and torch.equal(pa, pb)
    assert a.min() >= -1 and a.max() <= 1


def test_flip_swaps_sides_and_is_an_involution() -> None:
    images, rcv = render_synthetic(np.random.default_rng(1), 2, 32, 16)
    flipped, frcv = flip_horizontal(images, rcv)
    assert torch.equal(flipped[..., 0], images[..., -1])
    r_shoulder, l_shoulder = KEYPOINT_NAMES.index("r_shoulder"), KEYPOINT_NAMES.index("l_shoulder")
    assert FLIP_ORDER[r_shoulder] == l_shoulder
    if rcv[0, l_shoulder, 2] > 0:
        assert frcv[0, r_shoulder, 1] == pytest.approx(16 - rcv[0, l_shoulder, 1].item())
    back_images, back_rcv = flip_horizontal(flipped, frcv)
    assert torch.equal(back_images, images)
    assert torch.allclose(back_rcv, rcv)


def test_gaussian_blur() -> None:
    images = torch.rand(2, 3, 16, 8)
    assert torch.allclose(gaussian_blur(images, 0.0), images, atol=1e-6)
    flat = torch.full((1, 3, 16, 8), 0.3)
    assert torch.allclose(gaussian_blur(flat, 1.0), flat, atol=1e-6)
    blurred = gaussian_blur(images, torch.tensor([0.0, 1.0]))
    assert torch.allclose(blurred[0], images[0], atol=1e-6)
    assert blurred[1].std() < images[1].std()
    assert torch.allclose(blurred[1:], gaussian_blur(images[1:], 1.0), atol=1e-6)


# --------------------------------------------------------------------------------------------------
# Saving and loading


def test_save_load_round_trip(tmp_path: Path) -> None:
    probe = _probe(seed=3)
    probe.training_record = {"steps": 7, "seed": 3, "losses": [(1.0, 0.5)]}
    save_probe(probe, tmp_path / "p", metadata={"note": "test"})
    info = json.loads((tmp_path / "p" / PROBE_JSON).read_text())
    assert info["config"] == SMALL.to_dict()
    assert info["training"] == {"steps": 7, "seed": 3}
    assert len(info["files"][PROBE_WEIGHTS]) == 64
    loaded = load_probe(tmp_path / "p")
    assert loaded.config == SMALL and not loaded.training
    images = torch.rand(4, 3, 32, 16) * 2 - 1
    heat_a, vis_a = probe(images)
    heat_b, vis_b = loaded(images)
    assert torch.equal(heat_a, heat_b) and torch.equal(vis_a, vis_b)
    assert torch.equal(estimate(probe, images), estimate(loaded, images))


def test_tampered_or_missing_files_raise(tmp_path: Path) -> None:
    folder = save_probe(_probe(), tmp_path / "p")
    weights = folder / PROBE_WEIGHTS
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ProbeError, match=r"probe\.safetensors: SHA-256 mismatch"):
        load_probe(folder)
    weights.unlink()
    with pytest.raises(ProbeError, match=r"probe\.safetensors: missing"):
        load_probe(folder)
    with pytest.raises(ProbeError, match="no probe description"):
        load_probe(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------------
# pose_error


def test_pose_error_known_answers() -> None:
    height = 64  # PCK thresholds: 6.4 px at 0.1, 3.2 px at 0.05
    req = np.zeros((2, 18, 3), np.float32)
    req[:, :, 0], req[:, :, 1], req[:, :, 2] = 20.0, 10.0, 1.0
    req[0, 17] = 0  # requested invisible
    req[1, 16:] = 0
    est = req.copy()
    est[0, 0, :2] += (3.0, 4.0)  # 5 px: inside 6.4, outside 3.2
    est[0, 1, :2] += (6.0, 8.0)  # 10 px: outside both
    est[1, 0, :2] += (0.0, 3.2)  # 3.2 px: exactly at the 0.05 threshold (inclusive)
    est[1, 1] = 0  # missed
    est[0, 17] = (5.0, 5.0, 1.0)  # spurious
    out = pose_error(torch.from_numpy(est), req, height)
    # Visible in both: image 0 has 17 (keypoint 17 requested invisible), image 1 has 16 - 1 = 15.
    assert out["keypoints"] == 32
    assert out["requested_visible"] == 33 and out["missed"] == 1 and out["spurious"] == 1
    assert out["images"] == 2
    assert out["mean_px"] == pytest.approx((5 + 10 + 3.2) / 32)
    assert out["mean_frac"] == pytest.approx((5 + 10 + 3.2) / 32 / 64)
    assert out["pck_0.1"] == pytest.approx(31 / 32)
    assert out["pck_0.05"] == pytest.approx(30 / 32)
    assert out["visibility_agreement"] == pytest.approx(34 / 36)
    assert all(isinstance(v, float | int) for v in out.values())


def test_pose_error_edge_cases() -> None:
    none = np.zeros((1, 18, 3), np.float32)
    out = pose_error(none, none, 64)
    assert out["keypoints"] == 0 and math.isnan(out["mean_px"]) and math.isnan(out["pck_0.1"])
    assert out["visibility_agreement"] == 1.0
    single = np.ones((18, 3), np.float32)
    assert pose_error(single, single, 64)["images"] == 1
    with pytest.raises(ValueError, match="differ"):
        pose_error(np.zeros((2, 18, 3)), np.zeros((1, 18, 3)), 64)
    with pytest.raises(ValueError, match=r"\[B, 18, 3\]"):
        pose_error(np.zeros((1, 17, 3)), np.zeros((1, 17, 3)), 64)


# --------------------------------------------------------------------------------------------------
# Training and the bundled probe


def test_short_training_run_reduces_the_heatmap_loss() -> None:
    probe = train_pose_probe(SMALL, steps=40, batch_size=8, seed=0, progress=False, lr=3e-3)
    losses = np.asarray(probe.training_record["losses"])
    assert losses.shape == (40, 2)
    first, last = losses[:8, 0].mean(), losses[-8:, 0].mean()
    assert last < first - 0.3, (first, last)
    assert not probe.training
    assert probe.training_record["steps"] == 40 and probe.training_record["seed"] == 0


def test_bundled_probe_on_held_out_synthetic_people() -> None:
    probe = load_probe(DEFAULT_PROBE)
    assert probe.config.height == 64 and probe.config.width == 32
    out = evaluate_on_synthetic(probe, 64, seed=12345)
    assert out["keypoints"] > 900
    assert out["pck_0.1"] >= PCK_FLOOR, out
    assert out["mean_px"] <= MEAN_PX_CEILING, out
    assert out["visibility_agreement"] >= 0.95, out
    blurred = evaluate_on_synthetic(probe, 64, seed=12345, blur_sigma=1.0)
    assert blurred["pck_0.1"] >= BLURRED_PCK_FLOOR, blurred
    assert blurred["mean_px"] <= BLURRED_MEAN_PX_CEILING, blurred
