"""BlazePose → COCO-18 mapping (always) and MediaPipe on a real photo (when installed)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpig_core.data import pose_estimation
from dpig_core.data.pose_estimation import (
    PoseEstimator,
    PoseEstimatorUnavailable,
    blazepose_to_rcv,
    estimate_pose,
)


def landmarks() -> np.ndarray:
    """33 landmarks [x, y, z, visibility]; landmark i at x = (i + 0.5) / 40, y = (i + 0.5) / 33."""
    i = np.arange(33)
    return np.stack([(i + 0.5) / 40, (i + 0.5) / 33, np.zeros(33), np.ones(33)], axis=1)


def test_blazepose_to_coco18_mapping() -> None:
    rcv = blazepose_to_rcv(landmarks(), height=330, width=400)

    def at(i: int) -> list[float]:  # BlazePose landmark i in pixels (row, col, vis)
        return [(i + 0.5) * 10, (i + 0.5) * 10, 1]

    expected = {0: 0, 2: 12, 3: 14, 4: 16, 5: 11, 6: 13, 7: 15, 8: 24, 9: 26, 10: 28}
    expected |= {11: 23, 12: 25, 13: 27, 14: 5, 15: 2, 16: 8, 17: 7}
    for slot, index in expected.items():
        np.testing.assert_allclose(rcv[slot], at(index), rtol=1e-6)
    np.testing.assert_allclose(rcv[1], [120, 120, 1], rtol=1e-6)  # neck: mean of 11.5 and 12.5
    assert rcv.dtype == np.float32 and rcv.shape == (18, 3)


def test_blazepose_drops_invisible_and_out_of_frame_landmarks() -> None:
    marks = landmarks()
    marks[12, 3] = 0.49  # right shoulder barely invisible → r_shoulder and the neck go
    marks[16, 0] = 1.0  # right wrist at x = width: outside
    marks[27, 1] = -0.01  # left ankle above the frame
    rcv = blazepose_to_rcv(marks, height=330, width=400)
    for slot in (1, 2, 4, 13):
        assert rcv[slot].tolist() == [0, 0, 0]
    assert int(rcv[:, 2].sum()) == 14
    with pytest.raises(ValueError, match="expected 33 landmarks"):
        blazepose_to_rcv(marks[:17], 10, 10)


def test_missing_mediapipe_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mediapipe", None)  # makes `import mediapipe` fail
    monkeypatch.delattr(pose_estimation._local, "estimator", raising=False)
    with pytest.raises(PoseEstimatorUnavailable, match=r"pip install 'dpig\[pose\]'"):
        PoseEstimator()
    with pytest.raises(PoseEstimatorUnavailable, match="mediapipe==0.10.21"):
        estimate_pose(np.zeros((64, 32, 3), dtype=np.uint8))


def test_estimator_rejects_non_rgb_uint8() -> None:
    pytest.importorskip("mediapipe")
    with PoseEstimator() as estimator, pytest.raises(ValueError, match="RGB uint8"):
        estimator(np.zeros((64, 32), dtype=np.uint8))


def test_no_person_in_a_blank_image() -> None:
    pytest.importorskip("mediapipe")
    assert estimate_pose(np.full((256, 128, 3), 128, dtype=np.uint8)) is None


def test_estimate_pose_on_a_real_photo() -> None:
    """Set DPIG_TEST_PHOTO to a full-body photo, e.g. ultralytics' assets/bus.jpg (AGPL-3.0, so it
    is not committed: `pip download --no-deps ultralytics` and unzip it)."""
    pytest.importorskip("mediapipe")
    photo = os.environ.get("DPIG_TEST_PHOTO")
    if not photo or not Path(photo).is_file():
        pytest.skip("set DPIG_TEST_PHOTO to a photo of a standing person (e.g. bus.jpg)")
    image = np.asarray(Image.open(photo).convert("RGB"))
    rcv = estimate_pose(image)
    assert rcv is not None
    height, width = image.shape[:2]
    vis = rcv[:, 2] > 0
    assert vis.sum() >= 12
    assert (rcv[vis, 0] < height).all() and (rcv[vis, 1] < width).all()
    # An upright person: head above neck above hips above knees above ankles.
    rows = {k: rcv[k, 0] for k in range(18) if vis[k]}
    for upper, lower in ((0, 1), (1, 8), (1, 11), (8, 9), (11, 12), (9, 10), (12, 13)):
        if upper in rows and lower in rows:
            assert rows[upper] < rows[lower], (upper, lower)
