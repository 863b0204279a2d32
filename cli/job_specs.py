"""Job specs from command-line inputs: pose files and their frames, source folders or S3
prefixes with their keypoints, image references, and the fields every `dpig submit` shares.
Everything here is checked before a request is made: bad input exits with code 2."""

from __future__ import annotations

import re
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit

from cli.client import JobClient
from cli.errors import fail
from cli.output_format import parse_format

_FRAME_RE = re.compile(r"^\s*(\d+)\s*[xX×]\s*(\d+)\s*$")


def parse_frame(value: str, field: str = "pose-size") -> tuple[int, int]:
    match = _FRAME_RE.match(value)
    if match is None or min(int(match.group(1)), int(match.group(2))) <= 0:
        fail(f"{field}: expected HEIGHTxWIDTH such as 128x64, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _as_local(uri: str) -> Path:
    return Path(unquote(urlsplit(uri).path)) if uri.startswith("file://") else Path(uri)


def _keypoints_json(rcv: Any) -> list[list[float]]:
    import numpy as np

    out: list[list[float]] = np.asarray(rcv, np.float64).tolist()
    return out


def _model_frame(client: JobClient, model: str) -> tuple[int, int] | None:
    resolution = str(client.model_info(model).get("resolution", ""))
    match = _FRAME_RE.match(resolution)
    return (int(match.group(1)), int(match.group(2))) if match else None


def load_poses(
    client: JobClient, path: Path, *, pose_size: tuple[int, int] | None, model: str
) -> list[dict[str, Any]]:
    """A pose file → spec poses, each with its frame: the file's own, else `pose_size`, else the
    model's (poses are then checked against it)."""
    from dpig_core.data.pose_files import PoseFileError, load_pose_file

    try:
        poses = load_pose_file(path, *(pose_size or (None, None)))
        if poses.frame is None:
            frame = _model_frame(client, model)
            if frame is None:
                fail(f"poses: {path.name} does not say its frame; pass --pose-size HxW")
            try:
                poses = load_pose_file(path, *frame)
            except PoseFileError as exc:
                fail(
                    f"poses: {exc} (the file does not say its frame, so the model's "
                    f"{frame[0]}x{frame[1]} is assumed; pass --pose-size HxW)"
                )
    except PoseFileError as exc:
        fail(f"poses: {exc}")
    assert poses.height is not None and poses.width is not None
    return [
        {"id": pid, "keypoints": _keypoints_json(rcv), "height": poses.height, "width": poses.width}
        for pid, rcv in poses
    ]


def read_keypoints_file(path: Path) -> dict[str, list[list[float]]]:
    """`--keypoints FILE`: a pose file (any supported format) whose pose ids name images, with
    keypoints in the images' own pixels."""
    from dpig_core.data.pose_files import PoseFileError, load_pose_file

    try:
        poses = load_pose_file(path)
    except PoseFileError as exc:
        fail(f"keypoints: {exc}")
    return {pid: _keypoints_json(rcv) for pid, rcv in poses}


def _match_keypoints(
    keys: list[str], given: dict[str, list[list[float]]]
) -> tuple[dict[str, list[list[float]]], int]:
    """Give image keys their keypoints by relative path, file name or stem (an OpenPose id
    `stem#0` counts as its stem); returns the matches and how many entries matched nothing."""
    by_name: dict[str, str] = {}
    for key in keys:
        pure = PurePosixPath(key)
        for alias in (pure.stem, pure.name, key):  # later, more specific aliases win
            by_name[alias] = key
    out: dict[str, list[list[float]]] = {}
    unmatched = 0
    for pid, kp in given.items():
        found = by_name.get(pid) or by_name.get(pid.removesuffix("#0"))
        if found is None:
            unmatched += 1
        else:
            out[found] = kp
    return out, unmatched


def _dataset_keypoints(folder: Path) -> dict[Path, list[list[float]]]:
    """Keypoints of the images under `folder` from its annotations (Market-1501, DeepFashion) or,
    for a split folder such as bounding_box_test/, from its parent's annotation CSVs."""
    from dpig_core.data.readers import DatasetError, read_dataset

    def read(root: Path) -> dict[Path, list[list[float]]]:
        try:
            records = read_dataset(root).records
        except DatasetError:
            return {}
        return {
            r.path.resolve(): _keypoints_json(r.rcv)
            for r in records
            if r.rcv is not None and r.path.resolve().is_relative_to(folder)
        }

    found = read(folder)
    if not found and any(folder.parent.glob("*annotation*.csv")):
        found = read(folder.parent)
    return found


def _local_image_keys(folder: Path) -> list[str]:
    """The source keys the job will see for a local folder (as the service lists them)."""
    from service.settings import get_settings
    from service.storage import open_image_source

    return open_image_source(
        folder.as_uri(), get_settings(), allowed_prefixes=[folder.as_uri()], field="images"
    ).keys()


def pose_grid_spec(
    client: JobClient,
    *,
    poses_file: Path,
    images: str,
    keypoints: Path | None = None,
    pose_size: tuple[int, int] | None = None,
    model: str = "default",
    seed: int = 0,
    chunk_size: int | None = None,
    layout: str = "webdataset",
    max_sources: int | None = None,
    notes: list[str] | None = None,
) -> dict[str, Any]:
    """The spec of a pose-grid job from a pose file and a source folder (or S3 prefix); what
    the user should know about the sources' keypoints is appended to `notes`."""
    notes = [] if notes is None else notes
    poses = load_poses(client, poses_file, pose_size=pose_size, model=model)
    given = read_keypoints_file(keypoints) if keypoints is not None else None
    spec: dict[str, Any] = {
        "kind": "pose_grid",
        "poses": poses,
        "model": model,
        "seed": seed,
        "chunk_size": chunk_size,
        "layout": layout,
        "max_sources": max_sources,
    }
    if _is_remote(images):
        spec["images"] = images
        spec["source_keypoints"] = given
        return spec
    folder = _as_local(images).expanduser()
    if client.mode == "embedded" or folder.exists():
        if not folder.exists():
            fail(f"images: {folder}: no such folder")
        if not folder.is_dir():
            fail(f"images: {folder}: not a folder")
        folder = folder.resolve()
        keys = _local_image_keys(folder)  # none: the service says so
        if isinstance(max_sources, int) and max_sources > 0:
            keys = keys[:max_sources]
        if given is not None:
            found, unmatched = _match_keypoints(keys, given)
            if unmatched and not max_sources:
                notes.append(f"{unmatched} entries of {keypoints} match no image in {folder}")
        else:
            by_path = _dataset_keypoints(folder)
            found = {k: by_path[folder / k] for k in keys if folder / k in by_path}
        missing = len(keys) - len(found)
        if missing:
            notes.append(
                f"{missing} of {len(keys)} source images have no keypoints: they are estimated "
                "(needs the `pose` extra) or fail as items"
            )
        spec["source_keypoints"] = found or None
    else:
        spec["source_keypoints"] = given
    spec["images"] = str(folder)
    return spec


class ImageRefs:
    """Reference images (`--fg/--bg/--pose`, swap and interpolate rows) → spec ImageRefs with
    keypoints from `--keypoints`, else from the annotations of the image's dataset."""

    def __init__(self, client: JobClient, keypoints: Path | None) -> None:
        self.client = client
        self.given = read_keypoints_file(keypoints) if keypoints is not None else None
        self._folders: dict[Path, dict[Path, list[list[float]]]] = {}

    def _lookup_given(self, uri: str) -> list[list[float]] | None:
        if self.given is None:
            return None
        pure = PurePosixPath(urlsplit(uri).path if "://" in uri else uri)
        for alias in (uri, pure.as_posix(), pure.name, pure.stem, pure.stem + "#0"):
            if alias in self.given:
                return self.given[alias]
        return None

    def _annotated(self, path: Path) -> list[list[float]] | None:
        for folder in (path.parent, path.parent.parent):
            if not any(folder.glob("*annotation*.csv")):
                continue
            if folder not in self._folders:
                self._folders[folder] = _dataset_keypoints(folder)
            if path in self._folders[folder]:
                return self._folders[folder][path]
        return None

    def ref(self, value: Any, field: str) -> dict[str, Any]:
        """A path or URI (or a {uri, keypoints} object) → {"uri", "keypoints"}."""
        if isinstance(value, dict):
            uri, keypoints = value.get("uri"), value.get("keypoints")
        else:
            uri, keypoints = value, None
        if not isinstance(uri, str) or not uri.strip():
            fail(f"{field}: expected an image path or URI, got {uri!r}")
        if keypoints is None:
            keypoints = self._lookup_given(uri)
        if _is_remote(uri):
            return {"uri": uri, "keypoints": keypoints}
        path = _as_local(uri).expanduser()
        if self.client.mode == "embedded" or path.exists():
            if not path.is_file():
                fail(f"{field}: {uri}: no such image file")
            path = path.resolve()
            if keypoints is None:
                keypoints = self._annotated(path)
        return {"uri": str(path), "keypoints": keypoints}


def common_fields(
    model: str,
    seed: int,
    chunk_size: int | None,
    layout: str,
    image_format: str,
    expires_after: int | None = None,
    retain_days: int | None = None,
    callback_url: str | None = None,
) -> dict[str, Any]:
    return {
        "callback_url": callback_url,
        "model": model,
        "seed": seed,
        "chunk_size": chunk_size,
        "layout": layout,
        "output": output_spec(image_format),
        "expires_after": expires_after,
        "retain_days": retain_days,
    }


def output_spec(image_format: str) -> dict[str, Any]:
    try:
        return parse_format(image_format)
    except ValueError as exc:
        fail(str(exc))
