"""Submit-time checks of a pose grid's frozen sources that need more than the spec."""

from __future__ import annotations

from service.errors import JobError
from service.settings import Settings
from service.specs import PoseGridSpec


def check_source_poses(spec: PoseGridSpec, sources: list[str], settings: Settings) -> None:
    """Refuse (422) sources without keypoints when the workers cannot estimate them: every one
    of their items would fail. The workers can when `pose_estimator_installed` says so, or, unset,
    when this process can (the API and the workers share one image by default)."""
    given = spec.source_keypoints or {}
    missing = [key for key in sources if key not in given]
    if not missing:
        return
    from dpig_core.data.pose_estimation import estimator_installed

    installed = settings.pose_estimator_installed
    if installed if installed is not None else estimator_installed():
        return
    raise JobError(
        422,
        f"source_keypoints: {len(missing)} of {len(sources)} source images have no keypoints "
        f"(first: {missing[0][:200]!r}) and no pose estimator is installed; give their keypoints "
        "(--keypoints FILE, or the dataset's annotation CSV) or install one "
        "(pip install 'dpig[pose]')",
    )


def check_source_custom_ids(spec: PoseGridSpec, sources: list[str]) -> None:
    """Every key of `source_custom_ids` must name a listed source."""
    listed = set(sources)
    unknown = [key for key in spec.source_custom_ids or {} if key not in listed]
    if unknown:
        raise JobError(
            422,
            f"source_custom_ids: {len(unknown)} keys name no source image "
            f"(first: {unknown[0][:200]!r}); keys are the images' keys under `images`",
        )
