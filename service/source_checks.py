"""Submit-time checks of a pose grid's frozen sources that need more than the spec."""

from __future__ import annotations

from service.errors import JobError
from service.specs import PoseGridSpec


def check_source_poses(spec: PoseGridSpec, sources: list[str]) -> None:
    """Refuse (422) sources without keypoints when nothing here can estimate them: every one of
    their items would fail."""
    given = spec.source_keypoints or {}
    missing = [key for key in sources if key not in given]
    if not missing:
        return
    from dpig_core.data.pose_estimation import estimator_installed

    if estimator_installed():
        return
    raise JobError(
        422,
        f"source_keypoints: {len(missing)} of {len(sources)} source images have no keypoints "
        f"(first: {missing[0][:200]!r}) and no pose estimator is installed; give their keypoints "
        "(--keypoints FILE, or the dataset's annotation CSV) or install one "
        "(pip install 'dpig[pose]')",
    )
