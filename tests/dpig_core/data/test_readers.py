"""Dataset readers on tiny fixtures in the real formats (Market-1501, DeepFashion, photos)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpig_core.data.readers import (
    DatasetError,
    check_images,
    deepfashion_identity,
    detect_format,
    index_report,
    mirror_rcv,
    read_dataset,
    read_deepfashion,
    read_market,
    read_photo_folder,
)
from dpig_core.pose import CSV_HEADER

# One Market pose (row = y, col = x; −1 = missing) inside a 128×64 image: l_hip (11) is missing.
YS = [16, 27, 27, 49, 65, 26, 51, 70, 69, 98, 124, -1, 98, 125, 13, 13, 15, 14]
XS = [34, 29, 17, 13, 18, 42, 48, 49, 22, 22, 19, -1, 42, 43, 31, 37, 26, 41]


def write_jpeg(path: Path, width: int = 64, height: int = 128, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=90)


def write_corrupt_jpeg(path: Path) -> None:
    """A JPEG cut in the middle of its scan data: the header parses, decoding fails."""
    write_jpeg(path, seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def csv_row(name: str, ys: list[int], xs: list[int]) -> str:
    return f"{name}: {ys}: {xs}"


def make_market(root: Path) -> Path:
    for name in (
        "0002_c1s1_000451_03.jpg",
        "0002_c3s1_000551_01.jpg",
        "0007_c2s3_071052_02.jpg",  # not in the CSV
        "0000_c1s1_000151_01.jpg",  # junk
    ):
        write_jpeg(root / "bounding_box_train" / name)
    write_jpeg(root / "bounding_box_train_flip" / "0002_c1s1_000451_03.jpg")
    for name in ("0001_c1s1_001051_00.jpg", "-1_c1s1_000000_00.jpg", "0009_c4s1_000001_00.jpg"):
        write_jpeg(root / "bounding_box_test" / name)
    write_corrupt_jpeg(root / "bounding_box_test" / "0005_c6s1_000076_03.jpg")
    write_jpeg(root / "query" / "0001_c5s1_000401_00.jpg")
    write_jpeg(root / "query" / "0010_c1s1_000201_00.jpg")
    shifted = [y + 1 if y >= 0 else -1 for y in YS]
    train = [
        CSV_HEADER,
        csv_row("0002_c1s1_000451_03.jpg", YS, XS),
        csv_row("0002_c3s1_000551_01.jpg", shifted, XS),
        csv_row("0000_c1s1_000151_01.jpg", YS, XS),
    ]
    out_of_image = [*XS[:4], 70, *XS[5:]]  # r_wrist at col 70 in a 64-wide image
    test = [
        CSV_HEADER,
        csv_row("0001_c1s1_001051_00.jpg", YS, XS),
        csv_row("0005_c6s1_000076_03.jpg", YS, XS),
        csv_row("0009_c4s1_000001_00.jpg", YS, out_of_image),
        csv_row("0001_c5s1_000401_00.jpg", YS, XS),
        csv_row("0010_c1s1_000201_00.jpg", YS[:17], XS[:17]),  # malformed: 17 keypoints
    ]
    (root / "market-annotation-train.csv").write_text("\n".join(train) + "\n")
    (root / "market-annotation-test.csv").write_text("\n".join(test) + "\n")
    return root


def expected_rcv(ys: list[int], xs: list[int]) -> np.ndarray:
    rcv = np.zeros((18, 3), dtype=np.float32)
    for k, (y, x) in enumerate(zip(ys, xs, strict=True)):
        if y != -1 and x != -1:
            rcv[k] = (y, x, 1)
    return rcv


def problem_kinds(index) -> Counter[str]:
    return Counter(p.kind for p in index.problems)


# --------------------------------------------------------------------------------------------------
# Market-1501


def test_market_records_identities_cameras_and_splits(tmp_path: Path) -> None:
    index = read_market(make_market(tmp_path))
    assert index.format == "market"
    rows = [(r.path.parent.name, r.name, r.identity, r.camera, r.split) for r in index.records]
    assert rows == [
        ("bounding_box_test", "0001_c1s1_001051_00.jpg", "0001", 1, "test"),
        ("bounding_box_test", "0005_c6s1_000076_03.jpg", "0005", 6, "test"),
        ("bounding_box_test", "0009_c4s1_000001_00.jpg", "0009", 4, "test"),
        ("bounding_box_train", "0002_c1s1_000451_03.jpg", "0002", 1, "train"),
        ("bounding_box_train", "0002_c3s1_000551_01.jpg", "0002", 3, "train"),
        ("bounding_box_train", "0007_c2s3_071052_02.jpg", "0007", 2, "train"),
        ("bounding_box_train_flip", "0002_c1s1_000451_03.jpg", "0002", 1, "train"),
        ("query", "0001_c5s1_000401_00.jpg", "0001", 5, "query"),
        ("query", "0010_c1s1_000201_00.jpg", "0010", 1, "query"),
    ]
    assert [r.path for r in index.records] == sorted(r.path for r in index.records)


def test_market_keypoints_and_problems(tmp_path: Path) -> None:
    index = read_market(make_market(tmp_path))
    by = {(r.path.parent.name, r.name): r for r in index.records}
    rcv = by["bounding_box_train", "0002_c1s1_000451_03.jpg"].rcv
    assert rcv is not None and rcv.dtype == np.float32
    np.testing.assert_array_equal(rcv, expected_rcv(YS, XS))
    assert rcv[11].tolist() == [0, 0, 0]  # the −1 keypoint is missing
    assert rcv[4].tolist() == [65, 18, 1]
    # The test CSV covers query too.
    np.testing.assert_array_equal(by["query", "0001_c5s1_000401_00.jpg"].rcv, expected_rcv(YS, XS))
    assert by["bounding_box_train", "0007_c2s3_071052_02.jpg"].rcv is None
    assert by["bounding_box_test", "0009_c4s1_000001_00.jpg"].rcv is None
    assert by["query", "0010_c1s1_000201_00.jpg"].rcv is None
    assert len(index.with_keypoints()) == 6

    assert problem_kinds(index) == {"junk_identity": 2, "missing_keypoints": 1, "bad_keypoints": 2}
    messages = {p.path.name if p.path else None: p.message for p in index.problems}
    assert messages["0007_c2s3_071052_02.jpg"].endswith("not in the keypoint annotations")
    assert messages["0009_c4s1_000001_00.jpg"] == (
        "0009_c4s1_000001_00.jpg: keypoint 4 (r_wrist) at row 65, col 70 is outside the 128x64 "
        "frame"
    )
    assert "market-annotation-test.csv line 6" in messages["0010_c1s1_000201_00.jpg"]
    assert "expected 18 ys and xs, got 17 and 17" in messages["0010_c1s1_000201_00.jpg"]
    junk = sorted(p.path.name for p in index.problems if p.kind == "junk_identity" and p.path)
    assert junk == ["-1_c1s1_000000_00.jpg", "0000_c1s1_000151_01.jpg"]


def test_market_flip_folder_gets_the_mirrored_pose(tmp_path: Path) -> None:
    index = read_market(make_market(tmp_path), splits=("train",))
    flip = next(r for r in index.records if r.path.parent.name == "bounding_box_train_flip")
    assert flip.rcv is not None
    # r_shoulder (2) of the flipped image is the unflipped l_shoulder (5) at col 63 − 42.
    assert flip.rcv[2].tolist() == [26, 63 - 42, 1]
    assert flip.rcv[5].tolist() == [27, 63 - 17, 1]
    assert flip.rcv[8].tolist() == [0, 0, 0]  # r_hip ← the missing l_hip
    assert flip.rcv[11].tolist() == [69, 63 - 22, 1]
    np.testing.assert_array_equal(mirror_rcv(mirror_rcv(flip.rcv, 64), 64), flip.rcv)
    no_flip = read_market(tmp_path, splits=("train",), include_flip=False)
    assert len(no_flip.records) == len(index.records) - 1


def test_market_without_annotations_and_unknown_split(tmp_path: Path) -> None:
    write_jpeg(tmp_path / "bounding_box_test" / "0001_c1s1_001051_00.jpg")
    write_jpeg(tmp_path / "bounding_box_test" / "nonsense.jpg")
    index = read_market(tmp_path)
    assert [(r.identity, r.rcv) for r in index.records] == [("0001", None)]
    assert problem_kinds(index) == {
        "no_annotations": 1,
        "missing_folder": 2,  # bounding_box_train/, query/
        "bad_name": 1,
    }
    with pytest.raises(DatasetError, match="unknown split 'val'"):
        read_market(tmp_path, splits=("val",))
    with pytest.raises(DatasetError, match="not a market dataset"):
        read_market(tmp_path, splits=("train",))


def test_check_images_moves_the_corrupt_jpeg_to_problems(tmp_path: Path) -> None:
    index = read_market(make_market(tmp_path))
    seen: list[int] = []
    check = check_images(index, max_workers=2, on_progress=seen.append)
    assert sum(seen) == 9
    assert check.unreadable == 1
    assert check.sizes == {(128, 64): 8}
    assert "0005_c6s1_000076_03.jpg" not in {r.name for r in index.records}
    unreadable = [p for p in index.problems if p.kind == "unreadable_image"]
    assert len(unreadable) == 1
    assert unreadable[0].path is not None and unreadable[0].path.name == "0005_c6s1_000076_03.jpg"
    assert "truncated" in unreadable[0].message

    report = index_report(index, check)
    assert report["images"] == 8
    assert report["identities"] == 5  # 0001, 0002, 0007, 0009, 0010
    assert report["with_keypoints"] == 5
    assert report["splits"] == {
        "train": {"images": 4, "identities": 2, "with_keypoints": 3},
        "test": {"images": 2, "identities": 2, "with_keypoints": 1},
        "query": {"images": 2, "identities": 2, "with_keypoints": 1},
    }
    assert list(report["splits"]) == ["train", "test", "query"]
    assert report["problems"] == {
        "bad_keypoints": 2,
        "junk_identity": 2,
        "missing_keypoints": 1,
        "unreadable_image": 1,
    }
    assert report["image_sizes"] == {"128x64": 8}
    json.dumps(report)  # JSON-ready


def test_check_images_survives_files_that_are_not_images(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "a" / "text.jpg").write_text("not a jpeg")
    write_jpeg(tmp_path / "a" / "ok.jpg", width=20, height=30)
    index = read_photo_folder(tmp_path)
    check = check_images(index)
    assert [r.name for r in index.records] == ["ok.jpg"]
    assert check.sizes_by_path == {tmp_path / "a" / "ok.jpg": (30, 20)}
    assert problem_kinds(index) == {"unreadable_image": 2}


# --------------------------------------------------------------------------------------------------
# DeepFashion


def test_deepfashion_identity_from_names() -> None:
    assert deepfashion_identity("fashionMENDenimid0000008001_1front.jpg") == "MEN/Denim/id_00000080"
    assert (
        deepfashion_identity("fashionWOMENBlouses_Shirtsid0000311501_7additional.jpg")
        == "WOMEN/Blouses_Shirts/id_00003115"
    )
    assert deepfashion_identity("00038_1_front.jpg") == "00038"


def test_deepfashion_pg2_layout(tmp_path: Path) -> None:
    for name in ("00038_1_front.jpg", "00038_2_side.jpg", "00105_1_front.jpg"):
        write_jpeg(tmp_path / "filted_up_train" / name, 32, 32)
    write_jpeg(tmp_path / "filted_up_train_flip" / "00038_1_front.jpg", 32, 32)
    write_jpeg(tmp_path / "filted_up_test" / "00200_4_full.jpg", 32, 32)
    write_jpeg(tmp_path / "filted_up_test_samples" / "00200_4_full.jpg", 32, 32)
    assert detect_format(tmp_path) == "deepfashion"
    index = read_dataset(tmp_path)
    rows = [(r.path.parent.name, r.identity, r.split, r.camera, r.rcv) for r in index.records]
    assert rows == [
        ("filted_up_test", "00200", "test", None, None),
        ("filted_up_train", "00038", "train", None, None),
        ("filted_up_train", "00038", "train", None, None),
        ("filted_up_train", "00105", "train", None, None),
        ("filted_up_train_flip", "00038", "train", None, None),
    ]
    assert problem_kinds(index) == {"no_annotations": 1}
    samples = read_deepfashion(tmp_path, splits=("test_samples",))
    assert [(r.path.parent.name, r.split) for r in samples.records] == [
        ("filted_up_test_samples", "test_samples")
    ]


def test_deepfashion_patn_layout(tmp_path: Path) -> None:
    train = [
        "fashionMENDenimid0000008001_1front.jpg",
        "fashionMENDenimid0000008002_2side.jpg",
        "fashionWOMENBlouses_Shirtsid0000311501_7additional.jpg",
    ]
    for name in train:
        write_jpeg(tmp_path / "train" / name, 44, 64)
    write_jpeg(tmp_path / "test" / "fashionWOMENDressesid0000262902_3back.jpg", 44, 64)
    ys = [10, 15, 15, 25, 35, 15, 25, 35, 35, 48, 60, 35, 48, 60, 8, 8, 9, 9]
    xs = [22, 22, 15, 13, 12, 29, 31, 32, 18, 18, 18, 26, 26, 26, 20, 24, 18, 26]
    (tmp_path / "fasion-resize-annotation-train.csv").write_text(
        "\n".join([CSV_HEADER, *(csv_row(n, ys, xs) for n in train[:2])]) + "\n"
    )
    (tmp_path / "fasion-resize-annotation-test.csv").write_text(
        f"{CSV_HEADER}\n{csv_row('fashionWOMENDressesid0000262902_3back.jpg', ys, xs)}\n"
    )
    assert detect_format(tmp_path) == "deepfashion"
    index = read_deepfashion(tmp_path)
    rows = [(r.split, r.identity, r.rcv is not None) for r in index.records]
    assert rows == [
        ("test", "WOMEN/Dresses/id_00002629", True),
        ("train", "MEN/Denim/id_00000080", True),
        ("train", "MEN/Denim/id_00000080", True),
        ("train", "WOMEN/Blouses_Shirts/id_00003115", False),
    ]
    np.testing.assert_array_equal(index.records[1].rcv, expected_rcv(ys, xs))
    assert problem_kinds(index) == {"missing_keypoints": 1}


# --------------------------------------------------------------------------------------------------
# Photo folders


def body25(points: dict[int, tuple[float, float, float]]) -> list[float]:
    flat = [0.0] * 75
    for k, (x, y, c) in points.items():
        flat[3 * k : 3 * k + 3] = [x, y, c]
    return flat


def make_photos(root: Path) -> tuple[Path, Path]:
    photos = root / "photos"
    write_jpeg(photos / "alice" / "a1.jpg", 40, 80)
    write_jpeg(photos / "alice" / "a2.png", 40, 80)
    write_jpeg(photos / "bob" / "b1.jpg", 40, 80)
    write_jpeg(photos / "top.webp", 40, 80)
    write_jpeg(photos / ".cache" / "skipped.jpg", 40, 80)
    (photos / "notes.txt").write_text("not an image")
    kp = root / "openpose"
    kp.mkdir()
    weak = body25({0: (20, 10, 0.2), 1: (20, 20, 0.2)})
    strong = body25({0: (21.5, 11, 0.9), 1: (20, 22, 0.8), 9: (15, 45, 0.7), 24: (1, 1, 0.9)})
    (kp / "a1_keypoints.json").write_text(
        json.dumps({"version": 1.3, "people": [{"pose_keypoints_2d": weak},
                                               {"pose_keypoints_2d": strong}]})
    )  # fmt: skip
    coco18 = [0.0] * 54
    coco18[0:3] = [10, 5, 0.8]  # nose
    coco18[3 * 10 : 3 * 10 + 3] = [12, 70, 0.6]  # r_ankle
    (kp / "a2.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": coco18}]}))
    (kp / "b1_keypoints.json").write_text(json.dumps({"people": []}))
    return photos, kp


def test_photo_folder_identities_and_openpose(tmp_path: Path) -> None:
    photos, kp = make_photos(tmp_path)
    assert detect_format(photos) == "folder"
    plain = read_photo_folder(photos)
    assert [
        (r.path.relative_to(photos).as_posix(), r.identity, r.split) for r in plain.records
    ] == [
        ("alice/a1.jpg", "alice", "all"),
        ("alice/a2.png", "alice", "all"),
        ("bob/b1.jpg", "bob", "all"),
        ("top.webp", "", "all"),
    ]
    assert all(r.rcv is None for r in plain.records) and plain.problems == []

    index = read_photo_folder(photos, keypoints=kp)
    a1, a2, b1, top = index.records
    expected = np.zeros((18, 3), dtype=np.float32)
    expected[0] = (11, 21.5, 1)  # the stronger person: (x, y) → (row, col)
    expected[1] = (22, 20, 1)
    expected[8] = (45, 15, 1)  # BODY_25 9 (RHip) → COCO-18 8; foot point 24 dropped
    np.testing.assert_array_equal(a1.rcv, expected)
    assert a2.rcv is not None
    assert a2.rcv[0].tolist() == [5, 10, 1] and a2.rcv[10].tolist() == [70, 12, 1]
    assert int(a2.rcv[:, 2].sum()) == 2
    assert b1.rcv is None and top.rcv is None
    assert [(p.kind, p.message) for p in index.problems] == [
        ("missing_keypoints", "b1_keypoints.json: no person"),
        ("missing_keypoints", "top.webp: no OpenPose JSON file"),
    ]


def test_photo_folder_bad_openpose_files(tmp_path: Path) -> None:
    photos, kp = make_photos(tmp_path)
    (kp / "b1_keypoints.json").write_text("{not json")
    (kp / "top.json").write_text(json.dumps({"people": [{"pose_keypoints_2d": [1.0] * 60}]}))
    index = read_photo_folder(photos, keypoints=kp)
    bad = {p.path.name: p.message for p in index.problems if p.kind == "bad_keypoints" and p.path}
    assert set(bad) == {"b1.jpg", "top.webp"}
    assert bad["b1.jpg"].startswith("b1_keypoints.json: Expecting property name")
    assert "18 (COCO) or 25 (BODY_25)" in bad["top.webp"] and "got 60 numbers" in bad["top.webp"]


def test_photo_folder_keypoints_csv(tmp_path: Path) -> None:
    photos, _ = make_photos(tmp_path)
    ys = [5] + [-1] * 17
    xs = [6] + [-1] * 17
    rows = [CSV_HEADER, csv_row("alice/a1.jpg", ys, xs), csv_row("b1.jpg", [90] + ys[1:], xs)]
    (tmp_path / "kp.csv").write_text("\n".join(rows) + "\n")
    index = read_photo_folder(photos, keypoints=tmp_path / "kp.csv")
    a1 = index.records[0]
    assert a1.rcv is not None and a1.rcv[0].tolist() == [5, 6, 1]
    kinds = [(p.kind, p.path.name if p.path else None) for p in index.problems]
    assert kinds == [
        ("missing_keypoints", "a2.png"),
        ("bad_keypoints", "b1.jpg"),  # row 90 in an 80-high image
        ("missing_keypoints", "top.webp"),
    ]
    with pytest.raises(DatasetError, match="no such keypoints file"):
        read_photo_folder(photos, keypoints=tmp_path / "missing.csv")


# --------------------------------------------------------------------------------------------------
# Detection and dispatch


def test_detect_format_and_read_dataset_errors(tmp_path: Path) -> None:
    assert detect_format(make_market(tmp_path / "m")) == "market"
    assert read_dataset(tmp_path / "m", "market").format == "market"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no images"):
        detect_format(empty)
    with pytest.raises(DatasetError, match="no such file or directory"):
        read_dataset(tmp_path / "nope")
    with pytest.raises(DatasetError, match="unknown format 'coco'"):
        read_dataset(tmp_path / "m", "coco")
    with pytest.raises(DatasetError, match="photo folders only"):
        read_dataset(tmp_path / "m", keypoints=tmp_path / "kp.csv")
    # Generic train/test folders without DeepFashion names are a photo folder.
    write_jpeg(tmp_path / "generic" / "train" / "x.png", 8, 8)
    assert detect_format(tmp_path / "generic") == "folder"
