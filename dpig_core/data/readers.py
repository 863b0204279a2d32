"""Dataset readers (spec §2.1): Market-1501, DeepFashion In-shop and plain photo folders.

Every reader lists images and attaches keypoints without decoding pixels (only image headers are
read, to check keypoints against the image size); `check_images` decodes them. Nothing here raises
for a bad item: it becomes a `Problem` and the reader goes on. `DatasetError` is only for a root
that cannot be read at all.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dpig_core.data.records import DatasetIndex, PersonRecord, Problem
from dpig_core.pose import (
    CSV_HEADER,
    FloatArray,
    PoseError,
    as_rcv,
    from_openpose,
    parse_keypoints_csv_line,
)

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
DATASET_FORMATS = ("market", "deepfashion", "folder")

MARKET_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("bounding_box_train", "bounding_box_train_flip"),
    "test": ("bounding_box_test",),
    "query": ("query",),
}
MARKET_JUNK_IDENTITIES = frozenset({"0000", "-1"})
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s(\d+)_")

# PG2/DPIG layout (folder → split) and PATN/GFLA layout.
DEEPFASHION_SPLITS: dict[str, tuple[str, ...]] = {
    "train": ("filted_up_train", "filted_up_train_flip"),
    "test": ("filted_up_test",),
    "test_samples": ("filted_up_test_samples",),
}
DEEPFASHION_PATN_SPLITS: dict[str, tuple[str, ...]] = {"train": ("train",), "test": ("test",)}
# `fashionWOMENBlouses_Shirtsid0000311501_7additional.jpg` is In-shop's
# `WOMEN/Blouses_Shirts/id_00003115/01_7_additional.jpg`.
_PATN_NAME = re.compile(r"^fashion(WOMEN|MEN)(.+?)id(\d{8})")

# Left/right keypoint pairs of COCO-18, swapped when a pose is mirrored.
_MIRROR_PAIRS = ((2, 5), (3, 6), (4, 7), (8, 11), (9, 12), (10, 13), (14, 15), (16, 17))


class DatasetError(ValueError):
    """A dataset root that cannot be read: missing, not a folder, or of no known layout."""


# --------------------------------------------------------------------------------------------------
# helpers


def _existing_dir(root: str | Path) -> Path:
    path = Path(root)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if not path.is_dir():
        raise DatasetError(f"{path}: not a directory")
    return path


def _is_image(path: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES) -> bool:
    return path.suffix.lower() in suffixes and not path.name.startswith(".")


def _list_images(
    folder: Path, suffixes: frozenset[str] = IMAGE_SUFFIXES, recursive: bool = False
) -> list[Path]:
    """Image files of `folder`, sorted; hidden files and folders are skipped."""
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and _is_image(p, suffixes))
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath, f) for f in filenames if _is_image(Path(f), suffixes))
    return sorted(found)


def _has_images(root: Path) -> bool:
    for _dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image(Path(f)) for f in filenames):
            return True
    return False


def image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) from the image header, or None when the header cannot be read."""
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception:  # Pillow raises OSError, SyntaxError, ValueError… for damaged files
        return None
    return height, width


def mirror_rcv(rcv: FloatArray, width: int) -> FloatArray:
    """The pose of the horizontally flipped image: col → width − 1 − col, left and right swapped."""
    out = np.array(rcv, dtype=np.float32, copy=True)
    vis = out[:, 2] > 0
    out[vis, 1] = width - 1 - out[vis, 1]
    for a, b in _MIRROR_PAIRS:
        out[[a, b]] = out[[b, a]]
    return out


@dataclass
class _Annotations:
    """Keypoint rows read from `name:keypoints_y:keypoints_x` files, keyed by file name."""

    files: list[Path] = field(default_factory=list)
    poses: dict[str, FloatArray] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)  # name → why the row was rejected


def _read_annotations(paths: Iterable[Path], problems: list[Problem]) -> _Annotations:
    """Read annotation CSVs row by row: a malformed row is recorded, never fatal."""
    ann = _Annotations()
    for path in paths:
        try:
            lines = path.read_text().splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem("bad_keypoints", f"{path.name}: cannot read ({exc})", path))
            continue
        if not lines or lines[0].strip() != CSV_HEADER:
            problems.append(
                Problem("bad_keypoints", f"{path.name}: first line must be {CSV_HEADER!r}", path)
            )
            continue
        ann.files.append(path)
        for lineno, line in enumerate(lines[1:], start=2):
            if not line.strip():
                continue
            try:
                name, rcv = parse_keypoints_csv_line(line)
            except (ValueError, TypeError) as exc:  # PoseError, or numbers that are not numbers
                name = Path(line.split(":", 1)[0].strip()).name
                message = f"{path.name} line {lineno}: {exc}"
                if name and ":" in line:
                    ann.bad[name] = message
                else:
                    problems.append(Problem("bad_keypoints", message, path))
                continue
            ann.poses[Path(name).name] = rcv
    return ann


def _usable_pose(path: Path, rcv: FloatArray, problems: list[Problem]) -> FloatArray | None:
    """`rcv` if it has a visible keypoint and lies inside the image, else None plus a problem."""
    if not (rcv[:, 2] > 0).any():
        problems.append(Problem("missing_keypoints", f"{path.name}: no visible keypoint", path))
        return None
    size = image_size(path)
    if size is not None:  # an unreadable header is check_images' business
        try:
            as_rcv(rcv, *size)
        except PoseError as exc:
            problems.append(Problem("bad_keypoints", f"{path.name}: {exc}", path))
            return None
    return rcv


def _annotated_pose(
    path: Path, ann: _Annotations, problems: list[Problem], *, mirrored_from: _Annotations | None
) -> FloatArray | None:
    """Look `path` up by file name; for a flip folder without its own annotations, mirror the
    annotation of the unflipped image (`mirrored_from`)."""
    source = mirrored_from if mirrored_from is not None else ann
    if path.name in source.bad:
        problems.append(Problem("bad_keypoints", source.bad[path.name], path))
        return None
    rcv = source.poses.get(path.name)
    if rcv is None:
        problems.append(
            Problem("missing_keypoints", f"{path.name}: not in the keypoint annotations", path)
        )
        return None
    if mirrored_from is not None and (size := image_size(path)) is not None:
        rcv = mirror_rcv(rcv, size[1])
    return _usable_pose(path, rcv, problems)


def _split_annotations(root: Path, problems: list[Problem]) -> tuple[_Annotations, _Annotations]:
    """Annotation CSVs in `root`: (regular, flip). Names with 'flip' annotate the flip folders."""
    csvs = sorted(root.glob("*annotation*.csv"))
    flip = [p for p in csvs if "flip" in p.name.lower()]
    regular = _read_annotations([p for p in csvs if p not in flip], problems)
    return regular, _read_annotations(flip, problems)


def _read_folders(
    root: Path,
    folders: Mapping[str, tuple[str, ...]],
    splits: Sequence[str],
    *,
    include_flip: bool,
    suffixes: frozenset[str],
    parse_name: Callable[[Path, list[Problem]], tuple[str, int | None] | None],
    fmt: str,
) -> DatasetIndex:
    unknown = [s for s in splits if s not in folders]
    if unknown:
        raise DatasetError(f"unknown split {unknown[0]!r}; choose from {', '.join(folders)}")
    wanted = [f for split in splits for f in folders[split] if not f.endswith("_flip")]
    if not any((root / f).is_dir() for f in wanted):
        raise DatasetError(
            f"{root}: not a {fmt} dataset (none of {', '.join(f + '/' for f in wanted)} found)"
        )
    index = DatasetIndex(root=root, format=fmt)
    problems = index.problems
    ann, flip_ann = _split_annotations(root, problems)
    if not ann.files and not flip_ann.files:
        problems.append(
            Problem("no_annotations", f"no *annotation*.csv in {root}: poses must be estimated")
        )
    for split in splits:
        for folder_name in folders[split]:
            is_flip = folder_name.endswith("_flip")
            folder = root / folder_name
            if is_flip and not include_flip:
                continue
            if not folder.is_dir():
                if not is_flip:
                    problems.append(Problem("missing_folder", f"no {folder_name}/ in {root}"))
                continue
            for path in _list_images(folder, suffixes):
                parsed = parse_name(path, problems)
                if parsed is None:
                    continue
                identity, camera = parsed
                rcv: FloatArray | None = None
                if is_flip and flip_ann.files:
                    rcv = _annotated_pose(path, flip_ann, problems, mirrored_from=None)
                elif is_flip and ann.files:
                    rcv = _annotated_pose(path, ann, problems, mirrored_from=ann)
                elif not is_flip and ann.files:
                    rcv = _annotated_pose(path, ann, problems, mirrored_from=None)
                index.records.append(PersonRecord(path, identity, split, camera, rcv))
    index.records.sort(key=lambda r: r.path)
    return index


# --------------------------------------------------------------------------------------------------
# Market-1501


def _market_name(path: Path, problems: list[Problem]) -> tuple[str, int | None] | None:
    match = _MARKET_NAME.match(path.name)
    if match is None:
        problems.append(
            Problem("bad_name", f"{path.name}: not a Market-1501 name (IIII_cXsY_…)", path)
        )
        return None
    identity = match.group(1)
    if identity in MARKET_JUNK_IDENTITIES:
        problems.append(
            Problem("junk_identity", f"{path.name}: junk/distractor identity {identity}", path)
        )
        return None
    return identity, int(match.group(2))


def read_market(
    root: str | Path,
    splits: Sequence[str] = ("train", "test", "query"),
    *,
    include_flip: bool = True,
) -> DatasetIndex:
    """Market-1501: `bounding_box_train/` (+ `bounding_box_train_flip/`), `bounding_box_test/`,
    `query/`; keypoints from the `*annotation*.csv` files in `root`.

    Identity is the 4-digit prefix, camera the digit after `c`. Junk (0000) and distractor (−1)
    images are skipped with one `junk_identity` problem each. A flip folder uses a
    `*flip*annotation*` CSV when there is one, else the mirrored pose of the unflipped image of the
    same name.
    """
    return _read_folders(
        _existing_dir(root), MARKET_SPLITS, splits, include_flip=include_flip,
        suffixes=frozenset({".jpg", ".png"}), parse_name=_market_name, fmt="market",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# DeepFashion In-shop


def deepfashion_identity(name: str) -> str:
    """`fashionMENDenimid0000008001_1front.jpg` → `MEN/Denim/id_00000080` (the In-shop item folder);
    any other name (PG2 layout) → its prefix before the first `_`."""
    match = _PATN_NAME.match(name)
    if match is not None:
        return f"{match.group(1)}/{match.group(2)}/id_{match.group(3)}"
    return Path(name).stem.split("_", 1)[0]


def _deepfashion_name(path: Path, problems: list[Problem]) -> tuple[str, int | None] | None:
    del problems  # every name yields an identity
    return deepfashion_identity(path.name), None


def _deepfashion_layout(root: Path) -> str:
    pg2 = {f for folders in DEEPFASHION_SPLITS.values() for f in folders}
    return "pg2" if any((root / f).is_dir() for f in pg2) else "patn"


def read_deepfashion(
    root: str | Path,
    splits: Sequence[str] = ("train", "test"),
    *,
    include_flip: bool = True,
) -> DatasetIndex:
    """DeepFashion In-shop in the PG2/DPIG layout (`filted_up_train/`, `filted_up_test/`, optional
    `_flip` and `_samples`; identity = prefix before the first `_`) or the PATN/GFLA layout
    (`train/`, `test/`, `fasion-resize-annotation-{train,test}.csv`; identity = item folder, e.g.
    `MEN/Denim/id_00000080`). Keypoints come from the `*annotation*.csv` files in `root`."""
    path = _existing_dir(root)
    patn = _deepfashion_layout(path) == "patn"
    return _read_folders(
        path, DEEPFASHION_PATN_SPLITS if patn else DEEPFASHION_SPLITS, splits,
        include_flip=include_flip, suffixes=IMAGE_SUFFIXES, parse_name=_deepfashion_name,
        fmt="deepfashion",
    )  # fmt: skip


# --------------------------------------------------------------------------------------------------
# Photo folders


def best_openpose_person(data: Any) -> FloatArray | None:
    """The person with the highest total confidence (the first on ties) of a parsed OpenPose JSON,
    or None when it lists nobody. Raises PoseError for a malformed file."""
    people = data.get("people") if isinstance(data, dict) else None
    if not isinstance(people, list):
        raise PoseError("OpenPose JSON has no 'people' list")
    best: FloatArray | None = None
    best_score = -np.inf
    for i, person in enumerate(people):
        flat = person.get("pose_keypoints_2d") if isinstance(person, dict) else None
        if not isinstance(flat, list):
            raise PoseError(f"person {i} has no 'pose_keypoints_2d' list")
        try:
            values = np.asarray(flat, dtype=np.float32)
        except (TypeError, ValueError):
            raise PoseError(f"person {i}: pose_keypoints_2d is not a list of numbers") from None
        if not np.isfinite(values).all():
            raise PoseError(f"person {i}: pose_keypoints_2d holds a value that is not finite")
        rcv = from_openpose(flat)
        score = float(values.reshape(-1, 3)[:, 2].sum()) if values.size % 3 == 0 else 0.0
        if score > best_score:
            best, best_score = rcv, score
    return best


def _openpose_file(keypoints: Path, relative: Path) -> Path | None:
    stem = relative.stem
    for folder in (keypoints / relative.parent, keypoints):
        for name in (f"{stem}_keypoints.json", f"{stem}.json"):
            if (folder / name).is_file():
                return folder / name
    return None


def _openpose_pose(
    path: Path, json_path: Path | None, problems: list[Problem]
) -> FloatArray | None:
    if json_path is None:
        problems.append(Problem("missing_keypoints", f"{path.name}: no OpenPose JSON file", path))
        return None
    try:
        rcv = best_openpose_person(json.loads(json_path.read_text()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, PoseError) as exc:
        problems.append(Problem("bad_keypoints", f"{json_path.name}: {exc}", path))
        return None
    if rcv is None:
        problems.append(Problem("missing_keypoints", f"{json_path.name}: no person", path))
        return None
    return _usable_pose(path, rcv, problems)


def read_photo_folder(root: str | Path, keypoints: str | Path | None = None) -> DatasetIndex:
    """Any folder of images (recursive). Identity = the parent folder relative to `root` ("" at the
    top), split "all". `keypoints`: a `name:keypoints_y:keypoints_x` CSV (names are file names or
    paths relative to `root`), a folder of OpenPose JSON files (`<stem>_keypoints.json` or
    `<stem>.json`, mirroring the image folders or flat), or None (poses to be estimated)."""
    path = _existing_dir(root)
    index = DatasetIndex(root=path, format="folder")
    problems = index.problems
    ann: _Annotations | None = None
    openpose: Path | None = None
    if keypoints is not None:
        kp = Path(keypoints)
        if kp.is_dir():
            openpose = kp
        elif kp.is_file() and kp.suffix.lower() == ".csv":
            ann = _read_annotations([kp], problems)
        elif not kp.exists():
            raise DatasetError(f"{kp}: no such keypoints file or folder")
        else:
            raise DatasetError(f"{kp}: keypoints must be a .csv file or a folder of OpenPose JSON")
    for image in _list_images(path, recursive=True):
        relative = image.relative_to(path)
        parent = relative.parent.as_posix()
        identity = "" if parent == "." else parent
        rcv: FloatArray | None = None
        if ann is not None:
            key = relative.as_posix()
            if key not in ann.poses and key not in ann.bad:
                key = image.name
            if key in ann.bad:
                problems.append(Problem("bad_keypoints", ann.bad[key], image))
            elif key in ann.poses:
                rcv = _usable_pose(image, ann.poses[key], problems)
            else:
                problems.append(
                    Problem("missing_keypoints", f"{relative}: not in the keypoint CSV", image)
                )
        elif openpose is not None:
            rcv = _openpose_pose(image, _openpose_file(openpose, relative), problems)
        index.records.append(PersonRecord(image, identity, "all", None, rcv))
    return index


# --------------------------------------------------------------------------------------------------
# Dispatch


def detect_format(root: str | Path) -> str:
    """ "market", "deepfashion" or "folder"; DatasetError when `root` holds no images at all."""
    path = _existing_dir(root)
    if any((path / f).is_dir() for folders in MARKET_SPLITS.values() for f in folders):
        return "market"
    if _deepfashion_layout(path) == "pg2":
        return "deepfashion"
    patn_folders = [path / "train", path / "test"]
    if any(f.is_dir() for f in patn_folders):
        if any(path.glob("fa*ion*annotation*.csv")):  # PATN spells it "fasion"
            return "deepfashion"
        for folder in patn_folders:
            if folder.is_dir() and any(
                p.name.startswith("fashion") and _is_image(p) for p in folder.iterdir()
            ):
                return "deepfashion"
    if _has_images(path):
        return "folder"
    raise DatasetError(
        f"{path}: not a Market-1501 or DeepFashion layout, and no images "
        f"({', '.join(sorted(IMAGE_SUFFIXES))}) below it"
    )


def read_dataset(
    root: str | Path, format: str = "auto", *, keypoints: str | Path | None = None
) -> DatasetIndex:
    """Read `root` as `format` ("auto" detects it); `keypoints` applies to photo folders only."""
    fmt = detect_format(root) if format == "auto" else format
    if fmt not in DATASET_FORMATS:
        raise DatasetError(f"unknown format {format!r}; choose auto, {', '.join(DATASET_FORMATS)}")
    if keypoints is not None and fmt != "folder":
        raise DatasetError(f"keypoints apply to photo folders only, not to format {fmt!r}")
    if fmt == "market":
        return read_market(root)
    if fmt == "deepfashion":
        return read_deepfashion(root)
    return read_photo_folder(root, keypoints)


# --------------------------------------------------------------------------------------------------
# Decoding check and report


@dataclass(frozen=True)
class ImageCheck:
    """What `check_images` found: the (height, width) of every readable image and the failures."""

    sizes_by_path: dict[Path, tuple[int, int]]
    unreadable: int

    @property
    def sizes(self) -> Counter[tuple[int, int]]:
        return Counter(self.sizes_by_path.values())


def _decode(path: Path) -> tuple[int, int] | str:
    try:
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:  # verify() leaves the image unusable: decode a fresh one
            image.load()
            width, height = image.size
    except Exception as exc:  # any decoder failure is a bad item, never a crash
        return f"{path.name}: {type(exc).__name__}: {exc}"
    return height, width


def check_images(
    index: DatasetIndex,
    *,
    max_workers: int = 4,
    on_progress: Callable[[int], None] | None = None,
) -> ImageCheck:
    """Decode every record's image (Pillow `verify()` plus a full `load()`), in threads.

    Unreadable or truncated images are moved, in place, from `index.records` to `index.problems`
    (kind `unreadable_image`). `on_progress(1)` is called after each image.
    """
    paths = [r.path for r in index.records]
    results: list[tuple[int, int] | str] = []
    with ThreadPoolExecutor(max_workers=max(1, max_workers)) as pool:
        for result in pool.map(_decode, paths):
            results.append(result)
            if on_progress is not None:
                on_progress(1)
    sizes: dict[Path, tuple[int, int]] = {}
    kept: list[PersonRecord] = []
    for record, result in zip(index.records, results, strict=True):
        if isinstance(result, str):
            index.problems.append(Problem("unreadable_image", result, record.path))
        else:
            sizes[record.path] = result
            kept.append(record)
    index.records = kept
    return ImageCheck(sizes_by_path=sizes, unreadable=len(paths) - len(kept))


def index_report(
    index: DatasetIndex, check: ImageCheck | None = None, *, examples: int = 5
) -> dict[str, Any]:
    """A JSON-ready summary: images, identities and keypoints per split, problems per kind (with up
    to `examples` of each), image sizes as "HxW" (only when `check` is given)."""
    order = {name: i for i, name in enumerate(("train", "test", "query", "test_samples", "all"))}
    splits: dict[str, dict[str, int]] = {}
    for split in sorted({r.split for r in index.records}, key=lambda s: (order.get(s, 99), s)):
        records = index.split(split)
        splits[split] = {
            "images": len(records),
            "identities": len({r.identity for r in records}),
            "with_keypoints": sum(r.rcv is not None for r in records),
        }
    kinds = Counter(p.kind for p in index.problems)
    problem_examples: dict[str, list[dict[str, str | None]]] = {}
    for problem in index.problems:
        shown = problem_examples.setdefault(problem.kind, [])
        if len(shown) < examples:
            path = str(problem.path) if problem.path is not None else None
            shown.append({"path": path, "message": problem.message})
    report: dict[str, Any] = {
        "root": str(index.root),
        "format": index.format,
        "images": len(index.records),
        "identities": len({r.identity for r in index.records}),
        "with_keypoints": len(index.with_keypoints()),
        "splits": splits,
        "problems": dict(sorted(kinds.items())),
        "problem_examples": dict(sorted(problem_examples.items())),
        "image_sizes": None,
    }
    if check is not None:
        report["image_sizes"] = {f"{h}x{w}": n for (h, w), n in check.sizes.most_common()}
    return report
