"""Pose files (DESIGN §3): every format, the validation errors, rescaling, writing and export."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dpig_core.data.pose_files import (
    POSE_FORMAT,
    PoseFileError,
    PoseSet,
    export_poses,
    load_pose_file,
    rescale_rcv,
    write_pose_file,
)
from dpig_core.data.records import PersonRecord
from dpig_core.pose import CSV_HEADER

YS = [16, 27, 27, 49, 65, 26, 51, 70, 69, 98, 124, -1, 98, 125, 13, 13, 15, 14]
XS = [34, 29, 17, 13, 18, 42, 48, 49, 22, 22, 19, -1, 42, 43, 31, 37, 26, 41]


def market_rcv() -> list[list[float]]:
    return [[y, x, 1] if y != -1 else [0, 0, 0] for y, x in zip(YS, XS, strict=True)]


def ours(poses: list[dict[str, object]], height: int = 128, width: int = 64) -> dict[str, object]:
    return {"format": POSE_FORMAT, "height": height, "width": width, "poses": poses}


def write_json(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------------------------------
# Our format


def test_write_and_load_our_format(tmp_path: Path) -> None:
    rcv = np.asarray(market_rcv(), dtype=np.float32)
    half = rcv.copy()
    half[0, :2] = (16.5, 34.25)
    path = tmp_path / "poses.json"
    write_pose_file(path, [("walk_00", rcv), ("walk_01", half)], 128, 64)
    text = path.read_text()
    assert text.startswith('{"format": "dpig-poses/1", "height": 128, "width": 64, "poses": [\n')
    assert '{"id": "walk_00", "rcv": [[16, 34, 1], [27, 29, 1],' in text
    loaded = load_pose_file(path)
    assert (loaded.format, loaded.frame, loaded.ids) == ("dpig", (128, 64), ["walk_00", "walk_01"])
    np.testing.assert_array_equal(loaded.stack(), np.stack([rcv, half]))
    assert loaded.poses[1][1][0].tolist() == [16.5, 34.25, 1]
    assert loaded.stack().dtype == np.float32 and loaded.stack().shape == (2, 18, 3)


def test_our_format_rescaled_to_the_requested_frame(tmp_path: Path) -> None:
    rcv = [[0, 0, 0]] * 18
    rcv = [[100, 200, 1], *rcv[1:]]
    path = write_json(tmp_path / "p.json", ours([{"id": "a", "rcv": rcv}], 256, 256))
    loaded = load_pose_file(path, height=128, width=64)
    assert loaded.frame == (128, 64)
    assert loaded.poses[0][1][0].tolist() == [50, 50, 1]
    assert loaded.poses[0][1][1].tolist() == [0, 0, 0]


WHERE = "poses.json: pose 3 ('walk_03'): "


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda r: r[:17], "pose must have 18 keypoints (COCO-18), got 17"),
        (
            lambda r: [*r[:4], [float("nan"), 20, 1], *r[5:]],
            "keypoint 4 (r_wrist) is not a finite number",
        ),
        (
            lambda r: [*r[:4], [140, 20, 1], *r[5:]],
            "keypoint 4 (r_wrist) at row 140, col 20 is outside the 128x64 frame",
        ),
        (
            lambda r: [*r[:4], [10, -1, 1], *r[5:]],
            "keypoint 4 (r_wrist) at row 10, col -1 is outside the 128x64 frame",
        ),
        (lambda r: [[0, 0, 0]] * 18, "no visible keypoint"),
        (
            lambda r: [[1, 2]] * 18,
            "pose must be 18 rows of (row, col, visibility), got shape (18, 2)",
        ),
        (lambda r: "walk", "pose is not numeric"),
    ],
)
def test_our_format_bad_pose_names_file_pose_and_keypoint(
    tmp_path: Path, mutate: object, message: str
) -> None:
    good = market_rcv()
    poses = [{"id": f"walk_{i:02d}", "rcv": good} for i in range(5)]
    poses[3]["rcv"] = mutate(good)  # type: ignore[operator]
    path = write_json(tmp_path / "poses.json", ours(poses))
    with pytest.raises(PoseFileError) as err:
        load_pose_file(path)
    assert str(err.value).startswith(WHERE + message)


def test_our_format_bad_files(tmp_path: Path) -> None:
    def error(data: object, name: str = "poses.json") -> str:
        path = tmp_path / name
        path.write_text(data if isinstance(data, str) else json.dumps(data))
        with pytest.raises(PoseFileError) as err:
            load_pose_file(path)
        return str(err.value)

    pose = {"id": "a", "rcv": market_rcv()}
    assert error('{"format": ') == (
        "poses.json: not valid JSON (Expecting value at line 1 column 12)"
    )
    assert error("") == "poses.json: not valid JSON (Expecting value at line 1 column 1)"
    assert error(ours([pose], height=0)) == "poses.json: 'height' must be a positive integer, got 0"
    assert error(ours([pose], width="64")) == (  # type: ignore[arg-type]
        "poses.json: 'width' must be a positive integer, got '64'"
    )
    assert error(ours([])) == "poses.json: 'poses' must be a non-empty list"
    assert error(ours([pose, pose])) == "poses.json: pose 1 ('a'): id already used by pose 0"
    assert error(ours([{"id": 3, "rcv": market_rcv()}])) == (
        "poses.json: pose 0: 'id' must be a non-empty string, got 3"
    )
    assert error({**ours([pose]), "format": "dpig-poses/2"}) == (
        "poses.json: unsupported format 'dpig-poses/2' (expected 'dpig-poses/1')"
    )
    assert error({"hello": 1}).startswith("poses.json: unrecognised pose file")
    with pytest.raises(PoseFileError, match=r"^missing\.json: no such file$"):
        load_pose_file(tmp_path / "missing.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(PoseFileError, match=r"^binary\.json: cannot read"):
        load_pose_file(tmp_path / "binary.json")


def test_write_pose_file_validates(tmp_path: Path) -> None:
    bad = np.asarray(market_rcv(), dtype=np.float32)
    bad[4] = (140, 20, 1)
    with pytest.raises(PoseFileError, match=r"out\.json: pose 0 \('x'\): keypoint 4 \(r_wrist\)"):
        write_pose_file(tmp_path / "out.json", [("x", bad)], 128, 64)
    assert not (tmp_path / "out.json").exists()
    with pytest.raises(PoseFileError, match=r"^empty\.json: no poses to write$"):
        write_pose_file(tmp_path / "empty.json", [], 128, 64)


# --------------------------------------------------------------------------------------------------
# OpenPose


def test_openpose_file_one_pose_per_person(tmp_path: Path) -> None:
    body25 = [0.0] * 75
    body25[0:3] = [30, 12, 0.9]  # nose at x=30, y=12
    body25[3 * 9 : 3 * 9 + 3] = [25, 60, 0.5]  # RHip → COCO r_hip (8)
    body25[3 * 22 : 3 * 22 + 3] = [20, 120, 0.9]  # a foot point: dropped
    coco18 = [0.0] * 54
    coco18[3 * 17 : 3 * 17 + 3] = [40.5, 10.25, 0.3]  # l_ear
    data = {"people": [{"pose_keypoints_2d": body25}, {"pose_keypoints_2d": coco18}]}
    path = write_json(tmp_path / "frame_000_keypoints.json", data)
    loaded = load_pose_file(path)
    assert loaded.format == "openpose" and loaded.frame is None
    assert loaded.ids == ["frame_000#0", "frame_000#1"]
    first, second = loaded.stack()
    assert first[0].tolist() == [12, 30, 1] and first[8].tolist() == [60, 25, 1]
    assert first[:, 2].sum() == 2
    assert second[17].tolist() == [10.25, 40.5, 1] and second[:, 2].sum() == 1
    assert load_pose_file(path, height=128, width=64).frame == (128, 64)
    with pytest.raises(PoseFileError) as err:
        load_pose_file(path, height=100, width=40)
    assert str(err.value) == (
        "frame_000_keypoints.json: pose 1 ('frame_000#1'): keypoint 17 (l_ear) at row 10.25, "
        "col 40.5 is outside the 100x40 frame"
    )


def test_openpose_folder_and_bad_people(tmp_path: Path) -> None:
    folder = tmp_path / "op"
    folder.mkdir()
    person = [0.0] * 54
    person[0:3] = [5, 6, 1]
    write_json(folder / "b_keypoints.json", {"people": [{"pose_keypoints_2d": person}]})
    write_json(folder / "a_keypoints.json", {"people": [{"pose_keypoints_2d": person}] * 2})
    write_json(folder / "c_keypoints.json", {"people": []})
    (folder / "notes.txt").write_text("ignored")
    loaded = load_pose_file(folder)
    assert loaded.ids == ["a#0", "a#1", "b#0"]
    assert loaded.poses[2][1][0].tolist() == [6, 5, 1]

    write_json(folder / "d_keypoints.json", {"people": [{"pose_keypoints_2d": [1.0] * 51}]})
    with pytest.raises(PoseFileError) as err:
        load_pose_file(folder)
    assert str(err.value) == (
        "op/d_keypoints.json: pose 3 ('d#0'): pose_keypoints_2d must hold 18 (COCO) or 25 "
        "(BODY_25) x,y,c triples, got 51 numbers"
    )
    nan = list(person)
    nan[3 * 4 + 2] = float("nan")
    write_json(folder / "d_keypoints.json", {"people": [{"pose_keypoints_2d": nan}]})
    with pytest.raises(PoseFileError, match=r"pose 3 \('d#0'\): keypoint 4 is not a finite"):
        load_pose_file(folder)
    write_json(folder / "d_keypoints.json", {"people": [{"face": []}]})
    with pytest.raises(PoseFileError, match="person 0 has no 'pose_keypoints_2d'"):
        load_pose_file(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(PoseFileError, match="^empty: folder holds no .json files$"):
        load_pose_file(empty)


# --------------------------------------------------------------------------------------------------
# COCO


def coco17(points: dict[int, tuple[float, float, int]]) -> list[float]:
    flat = [0.0] * 51
    for k, (x, y, v) in points.items():
        flat[3 * k : 3 * k + 3] = [x, y, v]
    return flat


def test_coco_annotations_with_image_sizes(tmp_path: Path) -> None:
    kps = coco17({0: (30, 10, 2), 5: (40, 30, 2), 6: (20, 34, 1), 16: (22, 120, 2)})
    data = {
        "images": [{"id": 7, "height": 128, "width": 64}],
        "annotations": [
            {"id": 101, "image_id": 7, "keypoints": kps, "num_keypoints": 4},
            {"id": 102, "image_id": 7, "keypoints": [0] * 51, "num_keypoints": 0},
        ],
    }
    loaded = load_pose_file(write_json(tmp_path / "person_keypoints.json", data))
    assert (loaded.format, loaded.frame, loaded.ids, loaded.skipped) == (
        "coco",
        (128, 64),
        ["101"],
        1,
    )
    rcv = loaded.poses[0][1]
    assert rcv[0].tolist() == [10, 30, 1]  # nose
    assert rcv[1].tolist() == [32, 30, 1]  # neck = shoulder midpoint
    assert rcv[2].tolist() == [34, 20, 1]  # COCO 6 (right shoulder) → r_shoulder
    assert rcv[5].tolist() == [30, 40, 1]  # COCO 5 (left shoulder) → l_shoulder
    assert rcv[10].tolist() == [120, 22, 1]  # COCO 16 (right ankle) → r_ankle
    assert rcv[:, 2].sum() == 5
    # The file's frame wins for validation; the requested frame rescales.
    assert load_pose_file(tmp_path / "person_keypoints.json", 64, 32).poses[0][1][0].tolist() == [
        5, 15, 1
    ]  # fmt: skip


def test_coco_mixed_image_sizes_need_a_frame(tmp_path: Path) -> None:
    kps = coco17({0: (30, 10, 2)})
    data = {
        "images": [{"id": 1, "height": 128, "width": 64}, {"id": 2, "height": 256, "width": 128}],
        "annotations": [{"image_id": 1, "keypoints": kps}, {"image_id": 2, "keypoints": kps}],
    }
    path = write_json(tmp_path / "coco.json", data)
    with pytest.raises(PoseFileError, match=r"different sizes \(128x64, 256x128\); give a frame"):
        load_pose_file(path)
    loaded = load_pose_file(path, 128, 64)
    assert loaded.ids == ["0", "1"]
    assert [rcv[0].tolist() for _, rcv in loaded] == [[10, 30, 1], [5, 15, 1]]


def test_coco_bare_lists_and_bad_counts(tmp_path: Path) -> None:
    triples = [[30, 10, 2]] + [[0, 0, 0]] * 16
    one = load_pose_file(write_json(tmp_path / "one.json", triples))
    assert one.ids == ["0"] and one.poses[0][1][0].tolist() == [10, 30, 1]
    flat = coco17({0: (30, 10, 2)})
    two = load_pose_file(write_json(tmp_path / "two.json", [flat, flat]))
    assert two.ids == ["0", "1"]
    assert load_pose_file(write_json(tmp_path / "flat.json", flat)).ids == ["0"]
    with pytest.raises(PoseFileError) as err:
        load_pose_file(write_json(tmp_path / "short.json", triples[:16]))
    assert str(err.value) == (
        "short.json: pose 0 ('0'): COCO keypoints must be 17 (x, y, v) triples, got 16"
    )
    nan = [[30, 10, 2], [float("nan"), 3, 2]] + [[0, 0, 0]] * 15
    with pytest.raises(
        PoseFileError, match=r"pose 0 \('0'\): keypoint 1 \(l_eye\) is not a finite"
    ):
        load_pose_file(write_json(tmp_path / "nan.json", nan))
    outside = {"images": [{"id": 1, "height": 20, "width": 20}],
               "annotations": [{"id": 9, "image_id": 1, "keypoints": flat}]}  # fmt: skip
    with pytest.raises(PoseFileError) as err:
        load_pose_file(write_json(tmp_path / "outside.json", outside))
    assert str(err.value) == (
        "outside.json: pose 0 ('9'): keypoint 0 (nose) at row 10, col 30 is outside the 20x20 frame"
    )


# --------------------------------------------------------------------------------------------------
# Market CSV


def test_market_csv(tmp_path: Path) -> None:
    rows = [
        CSV_HEADER,
        f"0002_c1s1_000451_03.jpg: {YS}: {XS}",
        "",
        f"0001_c1s1_0_00.jpg: {YS}: {XS}",
    ]
    path = tmp_path / "market-annotation-test.csv"
    path.write_text("\n".join(rows) + "\n")
    loaded = load_pose_file(path, 128, 64)
    assert loaded.format == "csv" and loaded.frame == (128, 64)
    assert loaded.ids == ["0002_c1s1_000451_03.jpg", "0001_c1s1_0_00.jpg"]
    np.testing.assert_array_equal(loaded.poses[0][1], np.asarray(market_rcv(), dtype=np.float32))

    path.write_text("\n".join([*rows, "broken: [1, 2]"]) + "\n")
    with pytest.raises(PoseFileError, match=r"^market-annotation-test\.csv: line 5: expected "):
        load_pose_file(path)
    path.write_text(f"{CSV_HEADER}\nx.jpg: {YS}: {XS}\n")
    with pytest.raises(PoseFileError) as err:
        load_pose_file(path, 100, 50)
    assert str(err.value) == (
        "market-annotation-test.csv: pose 0 ('x.jpg'): keypoint 10 (r_ankle) at row 124, col 19 "
        "is outside the 100x50 frame"
    )
    path.write_text("name,x,y\n")
    with pytest.raises(PoseFileError, match="first line must be 'name:keypoints_y:keypoints_x'"):
        load_pose_file(path)


# --------------------------------------------------------------------------------------------------
# Rescaling and export


def test_rescale_rcv() -> None:
    rcv = np.zeros((18, 3), dtype=np.float32)
    rcv[0] = (127, 63, 1)
    rcv[3] = (10, 5, 0)  # invisible values are dropped
    out = rescale_rcv(rcv, (128, 64), (256, 256))
    assert out[0].tolist() == [254, 252, 1]
    assert out[3].tolist() == [0, 0, 0]
    assert out.dtype == np.float32
    with pytest.raises(ValueError, match="positive"):
        rescale_rcv(rcv, (0, 64), (1, 1))
    with pytest.raises(PoseFileError, match="frame size is unknown"):
        PoseSet([("a", rcv)]).rescaled(10, 10)


def test_export_poses_is_sorted_deterministic_and_checks_sizes(tmp_path: Path) -> None:
    rcv = np.asarray(market_rcv(), dtype=np.float32)
    records = []
    for i in (3, 0, 4, 1, 2):
        path = tmp_path / "test" / f"000{i}_c1s1_000000_00.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 128)).save(path)
        records.append(PersonRecord(path, f"000{i}", "test", 1, rcv))
    records.append(PersonRecord(tmp_path / "test" / "none.jpg", "9", "test", 1, None))
    everything = export_poses(records, root=tmp_path)
    assert everything.frame == (128, 64)
    assert everything.ids == [f"test/000{i}_c1s1_000000_00.jpg" for i in range(5)]
    picked = export_poses(records, root=tmp_path, limit=2, seed=3)
    assert len(picked) == 2 and picked.ids == sorted(picked.ids)
    assert export_poses(records, root=tmp_path, limit=2, seed=3).ids == picked.ids
    scaled = export_poses(records, root=tmp_path, height=256, width=128)
    assert scaled.frame == (256, 128) and scaled.poses[0][1][4].tolist() == [130, 36, 1]

    big = tmp_path / "test" / "0009_c1s1_000000_00.jpg"
    Image.new("RGB", (128, 256)).save(big)
    records.append(PersonRecord(big, "0009", "test", 1, rcv))
    with pytest.raises(PoseFileError, match=r"different sizes: 128x64 \(5\), 256x128 \(1\)"):
        export_poses(records, root=tmp_path)
    with pytest.raises(PoseFileError, match="no images with keypoints"):
        export_poses(records[5:6], root=tmp_path)
