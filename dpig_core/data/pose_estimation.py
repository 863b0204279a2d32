"""COCO-18 poses for photos without keypoints, from MediaPipe BlazePose (optional extra `pose`).

mediapipe 0.10.21 is the last release with `mp.solutions.pose` and bundled model files, so it
works offline. It finds at most one person per image. mediapipe is imported only when an estimator
is made.
"""

from __future__ import annotations

import importlib.util
import threading
from types import TracebackType
from typing import Any

import numpy as np

from dpig_core.pose import NUM_KEYPOINTS, FloatArray, UInt8Array

INSTALL_HINT = "pip install 'dpig[pose]'"

# BlazePose landmark for each COCO-18 slot; the neck (−1) is the shoulder midpoint. MediaPipe's
# "left" is the person's left, as is COCO's l_*.
BLAZEPOSE_TO_COCO18: tuple[int, ...] = (
    0,  # nose
    -1,  # neck
    12, 14, 16,  # r_shoulder, r_elbow, r_wrist
    11, 13, 15,  # l_shoulder, l_elbow, l_wrist
    24, 26, 28,  # r_hip, r_knee, r_ankle
    23, 25, 27,  # l_hip, l_knee, l_ankle
    5, 2,  # r_eye, l_eye
    8, 7,  # r_ear, l_ear
)  # fmt: skip
NUM_BLAZEPOSE_LANDMARKS = 33


def estimator_installed() -> bool:
    """Whether mediapipe is importable here (cheap: nothing is imported)."""
    return importlib.util.find_spec("mediapipe") is not None


class PoseEstimatorUnavailable(RuntimeError):
    """mediapipe is not installed (or is a release without `solutions.pose`)."""


def _import_pose_solution() -> Any:
    try:
        import mediapipe as mp
    except ImportError as exc:
        raise PoseEstimatorUnavailable(
            f"pose estimation needs mediapipe==0.10.21 ({INSTALL_HINT}): {exc}"
        ) from None
    solutions = getattr(mp, "solutions", None)
    if solutions is None or not hasattr(solutions, "pose"):
        version = getattr(mp, "__version__", "?")
        raise PoseEstimatorUnavailable(
            f"mediapipe {version} has no solutions.pose; pose estimation needs "
            f"mediapipe==0.10.21 ({INSTALL_HINT})"
        )
    return solutions.pose


def blazepose_to_rcv(
    landmarks: Any, height: int, width: int, min_visibility: float = 0.5
) -> FloatArray:
    """33 BlazePose landmarks [x, y, z, visibility] (x, y as fractions of the width and height) →
    (18, 3) RCV in pixels. A landmark below `min_visibility` or outside the frame is missing; the
    neck is the midpoint of the two shoulders when both are present."""
    marks = np.asarray(landmarks, dtype=np.float64)
    if marks.shape != (NUM_BLAZEPOSE_LANDMARKS, 4):
        raise ValueError(f"expected 33 landmarks of (x, y, z, visibility), got {marks.shape}")
    rcv = np.zeros((NUM_KEYPOINTS, 3), dtype=np.float32)
    for slot, index in enumerate(BLAZEPOSE_TO_COCO18):
        if index < 0:
            continue
        x, y, _, visibility = marks[index]
        row, col = y * height, x * width
        if visibility >= min_visibility and 0 <= row < height and 0 <= col < width:
            rcv[slot] = (row, col, 1.0)
    if rcv[2, 2] > 0 and rcv[5, 2] > 0:
        rcv[1] = ((rcv[2, 0] + rcv[5, 0]) / 2, (rcv[2, 1] + rcv[5, 1]) / 2, 1.0)
    return rcv


class PoseEstimator:
    """One MediaPipe Pose graph (not thread-safe: use one per thread). Use as a context manager or
    call `close()`."""

    def __init__(
        self, *, min_visibility: float = 0.5, min_detection_confidence: float = 0.5
    ) -> None:
        pose = _import_pose_solution()
        # model_complexity 0 and 2 download their models at first use; 1 ships in the wheel.
        self._pose = pose.Pose(
            static_image_mode=True,
            model_complexity=1,
            enable_segmentation=False,
            min_detection_confidence=min_detection_confidence,
        )
        self.min_visibility = min_visibility

    def __call__(self, image: UInt8Array) -> FloatArray | None:
        """RGB uint8 [H, W, 3] → (18, 3) RCV, or None when no person (or no usable keypoint)."""
        pixels = np.asarray(image)
        if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
            raise ValueError(
                f"expected an RGB uint8 image [H, W, 3], got {pixels.dtype} {pixels.shape}"
            )
        result = self._pose.process(np.ascontiguousarray(pixels))
        if result.pose_landmarks is None:
            return None
        marks = [(m.x, m.y, m.z, m.visibility) for m in result.pose_landmarks.landmark]
        rcv = blazepose_to_rcv(marks, pixels.shape[0], pixels.shape[1], self.min_visibility)
        return rcv if (rcv[:, 2] > 0).any() else None

    def close(self) -> None:
        self._pose.close()

    def __enter__(self) -> PoseEstimator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


_local = threading.local()


def estimate_pose(image: UInt8Array) -> FloatArray | None:
    """The COCO-18 pose of the (single) person in an RGB uint8 [H, W, 3] image, or None when no
    person is found. Keeps one estimator per thread. Raises PoseEstimatorUnavailable without
    mediapipe."""
    estimator: PoseEstimator | None = getattr(_local, "estimator", None)
    if estimator is None:
        estimator = PoseEstimator()
        _local.estimator = estimator
    return estimator(image)
