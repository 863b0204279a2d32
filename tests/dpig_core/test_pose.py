"""dpig_core.pose: pose maps, limb masks, body-ROI boxes, keypoint converters (§2.2, §2.5–§2.7).

Expected values are worked out by hand in the comments next to them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dpig_core import pose as P
from dpig_core.pose import (
    BODY_ROIS,
    KEYPOINT_NAMES,
    LIMBS,
    NUM_KEYPOINTS,
    PoseError,
    RoiPadding,
    as_rcv,
    close_mask,
    denormalize_rcv,
    disk_offsets,
    from_coco17,
    from_openpose,
    from_xyc,
    limb_mask,
    normalize_rcv,
    pose_maps,
    pose_maps_np,
    read_keypoints_csv,
    read_openpose_json,
    roi_boxes,
    write_keypoints_csv,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def rcv_with(points: dict[int, tuple[float, float]]) -> np.ndarray:
    """An RCV array with the given keypoints visible at (row, col); every other one missing."""
    rcv = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    for k, (r, c) in points.items():
        rcv[k] = (r, c, 1.0)
    return rcv


def single_map(r: float, c: float, h: int = 32, w: int = 16, radius: int = 4) -> torch.Tensor:
    rcv = torch.from_numpy(rcv_with({0: (r, c)}))[None]
    return pose_maps(rcv, h, w, radius)[0, 0]


# --------------------------------------------------------------------------------------------------
# Constants


def test_keypoint_tables_match_spec() -> None:
    assert NUM_KEYPOINTS == 18 and len(KEYPOINT_NAMES) == 18
    assert KEYPOINT_NAMES[0] == "nose" and KEYPOINT_NAMES[1] == "neck"
    assert KEYPOINT_NAMES[8] == "r_hip" and KEYPOINT_NAMES[13] == "l_ankle"
    # §2.6, in the order of the reference `_getPoseMask`.
    assert LIMBS == (
        (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11),
        (11, 12), (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (1, 16), (1, 17),
        (8, 11), (11, 5), (8, 2), (16, 17),
    )  # fmt: skip
    # §2.7
    assert BODY_ROIS == (
        (0, 1, 2, 5, 14, 15, 16, 17), (2, 3, 4, 5, 6, 7, 8, 11), (8, 9, 10, 11, 12, 13),
        (5, 6, 7), (2, 3, 4), (11, 12, 13), (8, 9, 10),
    )  # fmt: skip


def test_disk_offsets_radius_4_has_49_points() -> None:
    offsets = disk_offsets(4)
    assert offsets.shape == (49, 2)
    assert len({tuple(o) for o in offsets.tolist()}) == 49
    assert ((offsets**2).sum(axis=1) <= 16).all()
    assert sorted(np.abs(offsets).max(axis=0).tolist()) == [4, 4]
    # radius 1: the 5-pixel plus; radius 2: 13 pixels (rows of 1, 3, 5, 3, 1).
    assert len(disk_offsets(1)) == 5
    assert len(disk_offsets(2)) == 13


# --------------------------------------------------------------------------------------------------
# Pose maps (§2.5)


def test_radius4_disk_has_49_pixels_and_rest_minus_one() -> None:
    m = single_map(10, 8)
    assert m.shape == (32, 16)
    assert int((m == 1).sum()) == 49
    assert int((m == -1).sum()) == 32 * 16 - 49
    # Row widths of the radius-4 disk, rows 6..14: dr=±4 → 1, ±3 → 5 (dc²≤7), ±2 → 7 (dc²≤12),
    # ±1 → 7 (dc²≤15), 0 → 9.
    per_row = (m == 1).sum(dim=1)
    assert per_row[6:15].tolist() == [1, 5, 7, 7, 9, 7, 7, 5, 1]
    assert per_row[:6].sum() == 0 and per_row[15:].sum() == 0
    rows, cols = torch.nonzero(m == 1, as_tuple=True)
    assert ((rows - 10) ** 2 + (cols - 8) ** 2 <= 16).all()
    assert m[10, 4] == 1 and m[10, 3] == -1 and m[6, 8] == 1 and m[6, 7] == -1 and m[7, 10] == 1


def test_disk_is_clipped_at_the_corner() -> None:
    # Quarter disk at (0, 0): dr=0 → dc 0..4 (5), dr=1 → 0..3 (4), dr=2 → 0..3 (4), dr=3 → 0..2 (3),
    # dr=4 → 0 (1): 17 pixels. (Check: 4·17 − 4·5 + 1 = 49.)
    m = single_map(0, 0)
    assert int((m == 1).sum()) == 17
    assert (m == 1).sum(dim=1)[:5].tolist() == [5, 4, 4, 3, 1]
    # Same at the bottom-right corner; no wrap-around to the opposite side.
    m = single_map(31, 15)
    assert int((m == 1).sum()) == 17
    assert (m[:20] == -1).all() and (m[:, :10] == -1).all()


def test_disk_is_clipped_at_an_edge() -> None:
    # Centre on the top edge, away from the sides: half disk = rows dr=0..4: 9 + 7 + 7 + 5 + 1 = 29.
    assert int((single_map(0, 8) == 1).sum()) == 29


def test_centres_are_floored() -> None:
    assert torch.equal(single_map(10.9, 8.7), single_map(10, 8))
    assert torch.equal(single_map(10.0, 8.99), single_map(10, 8))
    assert not torch.equal(single_map(11.0, 8), single_map(10, 8))


def test_invisible_keypoint_is_all_minus_one() -> None:
    rcv = torch.tensor(rcv_with({0: (10, 8)}))[None]
    rcv[0, 0, 2] = 0  # coordinates kept, visibility off
    maps = pose_maps(rcv, 32, 16)
    assert (maps == -1).all()


def test_pose_maps_batch_shape_and_values() -> None:
    rcv = torch.tensor(np.stack([rcv_with({0: (3, 4), 5: (20, 10)}), rcv_with({17: (31, 0)})]))
    maps = pose_maps(rcv, 32, 16)
    assert maps.shape == (2, 18, 32, 16) and maps.dtype == torch.float32
    assert set(maps.unique().tolist()) == {-1.0, 1.0}
    on = (maps == 1).sum(dim=(2, 3))
    # (3, 4): the dr = −4 pixel (row −1) is clipped → 48; (20, 10): whole disk; (31, 0): quarter.
    assert on[0, 0] == 48 and on[0, 5] == 49 and on[1, 17] == 17
    assert on.sum() == 48 + 49 + 17
    np.testing.assert_array_equal(pose_maps_np(rcv[0].numpy(), 32, 16), maps[0].numpy())


def test_pose_maps_other_radius() -> None:
    m = single_map(5, 5, radius=1)
    assert int((m == 1).sum()) == 5
    assert m[5, 5] == m[4, 5] == m[6, 5] == m[5, 4] == m[5, 6] == 1 and m[4, 4] == -1


def test_normalize_rcv_exact() -> None:
    rcv = rcv_with({0: (64, 16), 1: (0, 0), 2: (127, 63)})
    rcv[3] = (50, 50, 0)  # invisible with coordinates → (−1, −1, 0)
    out = normalize_rcv(torch.tensor(rcv)[None], 128, 64)
    assert out.shape == (1, 54)
    expect = np.tile(np.float32([-1, -1, 0]), 18)
    expect[0:3] = (0.0, -0.5, 1)  # 64/128·2−1, 16/64·2−1
    expect[3:6] = (-1, -1, 1)
    expect[6:9] = (127 / 64 - 1, 63 / 32 - 1, 1)  # 0.984375, 0.96875
    np.testing.assert_allclose(out[0].numpy(), expect, atol=0, rtol=0)


def test_denormalize_rcv_exact() -> None:
    coords = torch.tensor([[[0.0, -0.5], [1.0, 1.0], [-1.5, -2.0], [0.01, 0.0], [0.0, 0.0]]])
    vis = torch.tensor([[0.9, 1.0, 1.0, 1.0, 0.3]])
    out = denormalize_rcv(coords, vis, 128, 64)
    expect = [
        [64, 16, 1],  # (0+1)/2·128, (−0.5+1)/2·64
        [127, 63, 1],  # 128 → clipped to H−1, 64 → W−1
        [0, 0, 1],  # negative → 0
        [64, 32, 1],  # 1.01/2·128 = 64.64 → floored
        [0, 0, 0],  # visibility 0.3 → off, coordinates zeroed
    ]
    assert out[0].tolist() == expect


def test_normalize_then_denormalize_recovers_integer_pose() -> None:
    rcv = rcv_with({0: (64, 16), 4: (5, 60), 9: (127, 0)})
    n = normalize_rcv(torch.tensor(rcv)[None], 128, 64).view(1, 18, 3)
    back = denormalize_rcv(n[..., :2], n[..., 2], 128, 64)
    np.testing.assert_array_equal(back[0].numpy(), rcv)


# --------------------------------------------------------------------------------------------------
# Limb masks (§2.6)


def test_single_limb_gives_the_stamped_disks() -> None:
    # Neck (1) at (4, 4), right shoulder (2) at (4, 5), radius 1: length 1 → N = 1, endpoints only.
    # Two plus shapes; the union is closed under a 5×5 closing (and ≥ 3 px from the border, where
    # the closing has no border effect), so it comes back unchanged.
    mask = limb_mask(rcv_with({1: (4, 4), 2: (4, 5)}), 9, 10, radius=1)
    expect = np.zeros((9, 10), np.uint8)
    expect[3, 4:6] = 1
    expect[4, 3:7] = 1
    expect[5, 4:6] = 1
    np.testing.assert_array_equal(mask, expect)
    assert mask.dtype == np.uint8


def test_limb_with_interior_points() -> None:
    # Neck (4, 4) → right shoulder (4, 8), radius 1: length 4, N = 4 → interior points (4, 5),
    # (4, 6), (4, 7). Union of 5 pluses: row 3 cols 4..8, row 4 cols 3..9, row 5 cols 4..8
    # (closed under the closing).
    mask = limb_mask(rcv_with({1: (4, 4), 2: (4, 8)}), 9, 13, radius=1)
    expect = np.zeros((9, 13), np.uint8)
    expect[3, 4:9] = 1
    expect[4, 3:10] = 1
    expect[5, 4:9] = 1
    np.testing.assert_array_equal(mask, expect)


def test_limb_interior_points_before_closing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(P, "close_mask", lambda m: m)
    # (2, 2) → (8, 10), radius 2: length 10, N = 5; interior i/5: rows 2+6i/5 = 3.2, 4.4, 5.6, 6.8,
    # cols 2+8i/5 = 3.6, 5.2, 6.8, 8.4 → truncated centres (3, 3), (4, 5), (5, 6), (6, 8).
    mask = limb_mask(rcv_with({1: (2, 2), 2: (8, 10)}), 12, 14, radius=2)
    expect = np.zeros((12, 14), np.uint8)
    for r, c in [(2, 2), (3, 3), (4, 5), (5, 6), (6, 8), (8, 10)]:
        for dr, dc in disk_offsets(2):
            expect[r + dr, c + dc] = 1
    np.testing.assert_array_equal(mask, expect)
    # Short limb: length 3 < 2r → N = 1 → only the two end disks (13 + 13 − overlap).
    mask = limb_mask(rcv_with({1: (5, 5), 2: (5, 8)}), 12, 14, radius=2)
    expect = np.zeros((12, 14), np.uint8)
    for r, c in [(5, 5), (5, 8)]:
        for dr, dc in disk_offsets(2):
            expect[r + dr, c + dc] = 1
    np.testing.assert_array_equal(mask, expect)


def test_limb_with_an_invisible_endpoint_is_not_drawn() -> None:
    rcv = rcv_with({1: (4, 4), 2: (4, 5)})
    rcv[2, 2] = 0  # right shoulder missing, its coordinates left in place
    assert limb_mask(rcv, 9, 10, radius=1).sum() == 0
    # A visible keypoint of which no limb partner is visible draws nothing either.
    assert limb_mask(rcv_with({4: (3, 3)}), 7, 8, radius=1).sum() == 0
    # Limb (1, 2) drawn, but nothing towards the invisible elbow (3) placed far away.
    rcv = rcv_with({1: (4, 4), 2: (4, 5)})
    rcv[3] = (20, 20, 0)
    full = limb_mask(rcv, 30, 30, radius=1)
    assert full[10:].sum() == 0 and full.sum() == 8


def test_limb_mask_is_clipped_at_the_border() -> None:
    # Pluses at (0, 0) and (0, 1): row 0 cols 0..2, row 1 cols 0..1. The closing reflects at the
    # border (scipy/skimage 'reflect', as the reference), so it also fills (0, 3) and (0, 4): their
    # mirrored 5×5 windows lie inside the dilation (rows 0..2 × cols 0..4).
    mask = limb_mask(rcv_with({1: (0, 0), 2: (0, 1)}), 5, 5, radius=1)
    expect = np.zeros((5, 5), np.uint8)
    expect[0, 0:5] = 1
    expect[1, 0:2] = 1
    np.testing.assert_array_equal(mask, expect)


def two_blobs(gap: int) -> tuple[np.ndarray, np.ndarray]:
    """Two 3×4 blobs `gap` columns apart, 3 px from every border; and the same, gap filled."""
    w = 3 + 4 + gap + 4 + 3
    mask = np.zeros((9, w), np.uint8)
    mask[3:6, 3:7] = 1
    mask[3:6, 7 + gap : 11 + gap] = 1
    filled = np.zeros((9, w), np.uint8)
    filled[3:6, 3 : 11 + gap] = 1
    return mask, filled


@pytest.mark.parametrize("gap", [1, 2, 4])
def test_close_mask_closes_small_gaps(gap: int) -> None:
    mask, filled = two_blobs(gap)
    # Every 5×5 window through a gap pixel reaches a blob on the same row: the gap is filled,
    # nothing above or below it.
    np.testing.assert_array_equal(close_mask(mask), filled)


def test_close_mask_keeps_a_five_pixel_gap_open() -> None:
    mask, _ = two_blobs(5)  # a 5×5 square fits in the gap
    np.testing.assert_array_equal(close_mask(mask), mask)


def test_close_mask_leaves_isolated_squares_unchanged() -> None:
    mask = np.zeros((9, 9), np.uint8)
    mask[3:6, 3:6] = 1
    np.testing.assert_array_equal(close_mask(mask), mask)
    corner = np.zeros((6, 6), np.uint8)
    corner[0:2, 0:2] = 1
    np.testing.assert_array_equal(close_mask(corner), corner)
    assert close_mask(np.zeros((4, 4), np.uint8)).sum() == 0
    np.testing.assert_array_equal(close_mask(np.ones((4, 3), np.uint8)), np.ones((4, 3)))


def test_close_mask_fills_a_hole() -> None:
    mask = np.zeros((11, 11), np.uint8)
    mask[3:8, 3:8] = 1
    mask[5, 5] = 0
    expect = mask.copy()
    expect[5, 5] = 1
    np.testing.assert_array_equal(close_mask(mask), expect)


def test_close_mask_matches_skimage_closing() -> None:
    morphology = pytest.importorskip("skimage.morphology")
    rng = np.random.default_rng(0)
    for _ in range(30):
        m = (rng.random((int(rng.integers(3, 16)), int(rng.integers(3, 16)))) < 0.3).astype(
            np.uint8
        )
        ref = morphology.closing(m, morphology.footprint_rectangle((5, 5)))
        np.testing.assert_array_equal(close_mask(m), ref)


# --------------------------------------------------------------------------------------------------
# Body-ROI boxes (§2.7)

MARKET_POSE = {
    0: (20, 30), 1: (30, 32), 2: (32, 22), 5: (33, 42), 3: (50, 18), 4: (66, 4),
    8: (70, 26), 11: (71, 38), 9: (95, 25), 10: (124, 24),
}  # fmt: skip


def test_market_boxes_exact() -> None:
    boxes, vis = roi_boxes(rcv_with(MARKET_POSE), 128, 64, RoiPadding.market())
    assert boxes.dtype == np.int64 and boxes.shape == (7, 4) and vis.shape == (7,)
    assert boxes.tolist() == [
        [14, 16, 39, 48],  # head: 0,1,2,5 → y 20..33, x 22..42, ±6
        [26, 0, 77, 48],  # upper: 2,3,4,5,8,11 → y 32..71, x 4..42 (4−6 clipped to 0)
        [64, 18, 127, 44],  # lower: 8,9,10,11 → y 70..124 (130 clipped to 127), x 24..38
        [23, 32, 43, 52],  # left arm: only 5 (33, 42) → ±10
        [26, 0, 72, 28],  # right arm: 2,3,4 → y 32..66, x 4..22
        [61, 28, 81, 48],  # left leg: only 11 (71, 38) → ±10
        [64, 18, 127, 32],  # right leg: 8,9,10 → y 70..124, x 24..26
    ]
    assert vis.tolist() == [1] * 7


def test_market_single_keypoint_clipped() -> None:
    # Only the left hip at (3, 60): left leg and lower body get ±10 → [−7, 50, 13, 70] → clipped.
    boxes, vis = roi_boxes(rcv_with({11: (3, 60)}), 128, 64, RoiPadding.market())
    assert boxes[5].tolist() == [0, 50, 13, 63]
    assert boxes[2].tolist() == [0, 50, 13, 63]
    assert boxes[1].tolist() == [0, 50, 13, 63]  # upper body contains 11 too
    assert vis.tolist() == [0, 1, 1, 0, 0, 1, 0]


def test_parts_without_visible_keypoints_get_the_unit_box() -> None:
    pose = {k: v for k, v in MARKET_POSE.items() if k not in (5, 11)}  # no left arm, no left leg
    rcv = rcv_with(pose)
    rcv[5] = (33, 42, 0)  # coordinates present but invisible: ignored
    boxes, vis = roi_boxes(rcv, 128, 64, RoiPadding.market())
    assert boxes[3].tolist() == [0, 0, 1, 1] and boxes[5].tolist() == [0, 0, 1, 1]
    assert vis.tolist() == [1, 1, 1, 0, 1, 0, 1]
    assert boxes[0].tolist() == [14, 16, 38, 38]  # head now 0,1,2 → y 20..32, x 22..32
    boxes, vis = roi_boxes(P.empty_rcv(), 128, 64, RoiPadding.market())
    assert boxes.tolist() == [[0, 0, 1, 1]] * 7 and vis.tolist() == [0] * 7


DF_POSE = {0: (60, 128), 1: (80, 128), 2: (80, 100), 5: (80, 156)}


def test_deepfashion_whole_body_boxes() -> None:
    # Whole body: (L-knee or L-ankle) and (R-knee or R-ankle) visible → r=10, r_single=20, nose −10.
    rcv = rcv_with({**DF_POSE, 9: (190, 110), 12: (190, 146)})
    before = rcv.copy()
    boxes, vis = roi_boxes(rcv, 256, 256, RoiPadding.deepfashion())
    np.testing.assert_array_equal(rcv, before)  # the caller's pose is not modified
    assert boxes.tolist() == [
        [40, 90, 90, 166],  # head: nose row 60 → 50; y 50..80, x 100..156, ±10
        [70, 90, 90, 166],  # upper: 2, 5
        [180, 100, 200, 156],  # lower: 9, 12 → y 190, x 110..146
        [60, 136, 100, 176],  # left arm: 5 alone, ±20
        [60, 80, 100, 120],  # right arm: 2 alone
        [170, 126, 210, 166],  # left leg: 12 alone
        [170, 90, 210, 130],  # right leg: 9 alone
    ]
    assert vis.tolist() == [1] * 7


def test_deepfashion_closeup_boxes() -> None:
    # No knee/ankle: close-up → r=20, r_single=40, nose −25.
    boxes, vis = roi_boxes(rcv_with(DF_POSE), 256, 256, RoiPadding.deepfashion())
    assert boxes[0].tolist() == [15, 80, 100, 176]  # nose 60 → 35; y 35..80, x 100..156, ±20
    assert boxes[1].tolist() == [60, 80, 100, 176]
    assert boxes[3].tolist() == [40, 116, 120, 196]  # 5 alone, ±40
    assert boxes[4].tolist() == [40, 60, 120, 140]
    assert vis.tolist() == [1, 1, 0, 1, 1, 0, 0]
    assert boxes[2].tolist() == [0, 0, 1, 1]


def test_deepfashion_one_sided_legs_is_closeup() -> None:
    # Right knee only: the left side is missing, so this is still a close-up (r_single = 40).
    boxes, _ = roi_boxes(rcv_with({**DF_POSE, 9: (190, 110)}), 256, 256, RoiPadding.deepfashion())
    assert boxes[6].tolist() == [150, 70, 230, 150]
    assert boxes[0].tolist() == [15, 80, 100, 176]


def test_deepfashion_nose_shift_clipped() -> None:
    # Nose alone at row 20, close-up: 20 − 25 = −5, ±40 → [−45, 88, 35, 168] → y1 clipped to 0.
    boxes, vis = roi_boxes(rcv_with({0: (20, 128)}), 256, 256, RoiPadding.deepfashion())
    assert boxes[0].tolist() == [0, 88, 35, 168]
    assert vis.tolist() == [1, 0, 0, 0, 0, 0, 0]
    # An invisible nose is not shifted (and not used).
    boxes, vis = roi_boxes(rcv_with({1: (80, 128)}), 256, 256, RoiPadding.deepfashion())
    assert boxes[0].tolist() == [40, 88, 120, 168]


def test_roi_padding_presets() -> None:
    assert (RoiPadding.market().pad, RoiPadding.market().pad_single) == (6, 10)
    df = RoiPadding.deepfashion()
    assert (df.pad, df.pad_single, df.closeup_pad, df.closeup_pad_single) == (10, 20, 20, 40)
    assert (df.nose_shift, df.closeup_nose_shift) == (10, 25)
    half = RoiPadding.market(0.5)
    assert (half.style, half.pad, half.pad_single) == ("market", 3, 5)
    d2 = RoiPadding.deepfashion(2.0)
    assert (d2.pad, d2.pad_single, d2.closeup_pad, d2.closeup_pad_single) == (20, 40, 40, 80)
    assert (d2.nose_shift, d2.closeup_nose_shift) == (20, 50)


# --------------------------------------------------------------------------------------------------
# Validation and converters


def test_as_rcv_normalises_invisible_and_visibility() -> None:
    raw = np.zeros((18, 3), np.float32)
    raw[0] = (5.5, 6.5, 0.7)  # any positive visibility → 1
    raw[1] = (9, 9, 0)  # invisible: coordinates reset
    out = as_rcv(raw)
    assert out.dtype == np.float32 and out.shape == (18, 3)
    assert out[0].tolist() == [5.5, 6.5, 1.0] and out[1].tolist() == [0, 0, 0]
    assert as_rcv(raw.tolist(), 128, 64)[0].tolist() == [5.5, 6.5, 1.0]


def test_as_rcv_rejects_17_keypoints() -> None:
    with pytest.raises(PoseError, match="18 keypoints.*got 17"):
        as_rcv(np.zeros((17, 3)))
    with pytest.raises(PoseError, match="shape"):
        as_rcv(np.zeros((18, 2)))
    with pytest.raises(PoseError, match="not numeric"):
        as_rcv([["a", "b", "c"]] * 18)
    assert issubclass(PoseError, ValueError)


def test_as_rcv_rejects_nan_naming_the_keypoint() -> None:
    raw = rcv_with({3: (10, 10)})
    raw[3, 1] = np.nan
    with pytest.raises(PoseError, match=r"keypoint 3 \(r_elbow\).*finite"):
        as_rcv(raw)
    raw = rcv_with({})
    raw[16, 0] = np.inf
    with pytest.raises(PoseError, match=r"keypoint 16 \(r_ear\)"):
        as_rcv(raw)


def test_as_rcv_rejects_out_of_frame_naming_the_keypoint() -> None:
    with pytest.raises(PoseError, match=r"keypoint 10 \(r_ankle\) at row 130, col 20.*128x64"):
        as_rcv(rcv_with({10: (130, 20)}), 128, 64)
    with pytest.raises(PoseError, match=r"keypoint 7 \(l_wrist\)"):
        as_rcv(rcv_with({7: (10, 64)}), 128, 64)  # col == W is outside
    with pytest.raises(PoseError, match=r"keypoint 0 \(nose\)"):
        as_rcv(rcv_with({0: (-0.5, 3)}), 128, 64)
    # Edge pixels are inside; invisible keypoints are never checked; without a size nothing is.
    as_rcv(rcv_with({10: (127, 63)}), 128, 64)
    raw = rcv_with({})
    raw[10] = (500, 500, 0)
    as_rcv(raw, 128, 64)
    as_rcv(rcv_with({10: (130, 20)}))


def test_from_openpose_coco18() -> None:
    flat: list[float] = []
    for k in range(18):
        flat += [100 + k, 200 + k, 0.0 if k in (3, 14) else 0.5]  # x, y, confidence
    rcv = from_openpose(flat)
    assert rcv[0].tolist() == [200, 100, 1]  # (row = y, col = x)
    assert rcv[17].tolist() == [217, 117, 1]
    assert rcv[3].tolist() == [0, 0, 0] and rcv[14].tolist() == [0, 0, 0]
    assert int(rcv[:, 2].sum()) == 16
    # A threshold turns low-confidence points into missing ones.
    assert from_openpose(flat, threshold=0.6)[:, 2].sum() == 0


def test_from_openpose_body25() -> None:
    flat: list[float] = []
    for k in range(25):
        flat += [2 * k + 1, 3 * k + 2, 0.0 if k == 12 else 0.9]  # BODY_25 index k
    rcv = from_openpose(flat)
    # COCO-18 slot ← BODY_25 index: 0..7 same, then 8 (MidHip) dropped: r_hip ← 9, …, l_ear ← 18.
    for slot, src in [(0, 0), (1, 1), (7, 7), (8, 9), (10, 11), (13, 14), (14, 15), (17, 18)]:
        assert rcv[slot].tolist() == [3 * src + 2, 2 * src + 1, 1], slot
    assert rcv[11].tolist() == [0, 0, 0]  # l_hip = BODY_25 12, confidence 0
    with pytest.raises(PoseError, match="18 .*25"):
        from_openpose([0.0] * 51)


def test_read_openpose_json(tmp_path: Path) -> None:
    people = [
        {"pose_keypoints_2d": [10.0, 20.0, 1.0] * 18},
        {"pose_keypoints_2d": [0.0, 0.0, 0.0] * 25},
    ]
    path = tmp_path / "frame_keypoints.json"
    path.write_text(json.dumps({"version": 1.3, "people": people}))
    out = read_openpose_json(path)
    assert len(out) == 2
    assert out[0][5].tolist() == [20, 10, 1] and out[1][:, 2].sum() == 0
    assert len(read_openpose_json({"people": []})) == 0
    with pytest.raises(PoseError, match="people"):
        read_openpose_json({"persons": []})


def test_from_xyc() -> None:
    rcv = from_xyc([[4.0, 7.0, 1.0]] + [[0.0, 0.0, 0.0]] * 17)
    assert rcv[0].tolist() == [7, 4, 1] and rcv[1:].sum() == 0


def coco17(points: dict[int, tuple[float, float, float]]) -> list[float]:
    flat = [0.0] * 51
    for k, (x, y, v) in points.items():
        flat[3 * k : 3 * k + 3] = [x, y, v]
    return flat


def test_from_coco17_with_neck() -> None:
    # COCO-17: 0 nose, 1 l_eye, 2 r_eye, 3 l_ear, 4 r_ear, 5 l_shoulder, 6 r_shoulder, 9 l_wrist,
    # 16 r_ankle.
    pts = {
        0: (30, 10, 2), 1: (33, 8, 2), 2: (27, 8, 1), 3: (36, 9, 2), 4: (24, 9, 2),
        5: (40, 20, 2), 6: (21, 24, 2), 9: (45, 50, 2), 16: (22, 120, 2),
    }  # fmt: skip
    rcv = from_coco17(coco17(pts))
    assert rcv[0].tolist() == [10, 30, 1]
    assert rcv[1].tolist() == [22, 30.5, 1]  # neck = shoulder midpoint: y (20+24)/2, x (40+21)/2
    assert rcv[2].tolist() == [24, 21, 1]  # r_shoulder ← COCO 6
    assert rcv[5].tolist() == [20, 40, 1]  # l_shoulder ← COCO 5
    assert rcv[7].tolist() == [50, 45, 1]  # l_wrist ← COCO 9
    assert rcv[10].tolist() == [120, 22, 1]  # r_ankle ← COCO 16
    assert rcv[14].tolist() == [8, 27, 1]  # r_eye ← COCO 2
    assert rcv[15].tolist() == [8, 33, 1]  # l_eye ← COCO 1
    assert rcv[16].tolist() == [9, 24, 1]  # r_ear ← COCO 4
    assert rcv[17].tolist() == [9, 36, 1]  # l_ear ← COCO 3
    assert int(rcv[:, 2].sum()) == 10
    # The 17×3 nested form gives the same result.
    np.testing.assert_array_equal(from_coco17(np.reshape(coco17(pts), (17, 3)).tolist()), rcv)


def test_from_coco17_neck_needs_both_shoulders() -> None:
    rcv = from_coco17(coco17({5: (40, 20, 2), 6: (21, 24, 0)}))
    assert rcv[1].tolist() == [0, 0, 0]
    assert rcv[2].tolist() == [0, 0, 0] and rcv[5].tolist() == [20, 40, 1]
    rcv = from_coco17(coco17({6: (21, 24, 2)}))
    assert rcv[1].tolist() == [0, 0, 0]
    with pytest.raises(PoseError, match="17"):
        from_coco17([0.0] * 54)


def test_market_csv_round_trip(tmp_path: Path) -> None:
    a = rcv_with({0: (10, 20), 1: (0, 0), 17: (127, 63)})
    b = rcv_with({})
    path = tmp_path / "market-annotation-test.csv"
    write_keypoints_csv(path, [("0002_c1s1_000451_03.jpg", a), ("0003_c2s1_000001_01.jpg", b)])
    lines = path.read_text().splitlines()
    assert lines[0] == "name:keypoints_y:keypoints_x"
    ys = [10, 0] + [-1] * 15 + [127]
    xs = [20, 0] + [-1] * 15 + [63]
    assert lines[1] == f"0002_c1s1_000451_03.jpg: {ys}: {xs}"
    assert lines[2] == f"0003_c2s1_000001_01.jpg: {[-1] * 18}: {[-1] * 18}"
    back = read_keypoints_csv(path)
    assert list(back) == ["0002_c1s1_000451_03.jpg", "0003_c2s1_000001_01.jpg"]
    np.testing.assert_array_equal(back["0002_c1s1_000451_03.jpg"], a)
    np.testing.assert_array_equal(back["0003_c2s1_000001_01.jpg"], b)


def test_market_csv_floors_and_rejects_bad_files(tmp_path: Path) -> None:
    path = tmp_path / "k.csv"
    write_keypoints_csv(path, [("x.jpg", rcv_with({3: (10.8, 5.2)}))])
    assert read_keypoints_csv(path)["x.jpg"][3].tolist() == [10, 5, 1]
    path.write_text("name,y,x\nx.jpg: [1]: [2]\n")
    with pytest.raises(PoseError, match="first line"):
        read_keypoints_csv(path)
    path.write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2]: [3, 4]\n")
    with pytest.raises(PoseError, match="x.jpg: expected 18"):
        read_keypoints_csv(path)
    path.write_text("name:keypoints_y:keypoints_x\nx.jpg: [1, 2: [3, 4]\n")
    with pytest.raises(PoseError, match="x.jpg"):
        read_keypoints_csv(path)
