"""`dpig data index` and `dpig data poses` through the real Typer app."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from cli.main import app
from dpig_core.data.pose_files import load_pose_file
from dpig_core.pose import CSV_HEADER

runner = CliRunner()

YS = [16, 27, 27, 49, 65, 26, 51, 70, 69, 98, 124, -1, 98, 125, 13, 13, 15, 14]
XS = [34, 29, 17, 13, 18, 42, 48, 49, 22, 22, 19, -1, 42, 43, 31, 37, 26, 41]
TEST_NAMES = [f"{i:04d}_c{i % 6 + 1}s1_{i:06d}_00.jpg" for i in range(1, 7)]


def make_market(root: Path) -> Path:
    """Four train images (one junk), six test images with keypoints, one corrupt query image."""
    rng = np.random.default_rng(0)

    def jpeg(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)).save(path)

    for name in ("0002_c1s1_000451_03.jpg", "0002_c2s1_000551_01.jpg", "0007_c2s3_071052_02.jpg"):
        jpeg(root / "bounding_box_train" / name)
    jpeg(root / "bounding_box_train" / "0000_c1s1_000151_01.jpg")
    for name in TEST_NAMES:
        jpeg(root / "bounding_box_test" / name)
    jpeg(root / "query" / "0001_c2s1_000401_00.jpg")
    corrupt = root / "query" / "0001_c2s1_000401_00.jpg"
    corrupt.write_bytes(corrupt.read_bytes()[:3000])
    rows = [CSV_HEADER, *(f"{n}: {YS}: {XS}" for n in ["0002_c1s1_000451_03.jpg", *TEST_NAMES])]
    (root / "market-annotation.csv").write_text("\n".join(rows) + "\n")
    return root


def test_index_prints_counts_and_problems(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "index", str(make_market(tmp_path))])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"market dataset at {tmp_path}" in out
    assert "│ train │      3 │          2 │              1 │" in out
    assert "│ test  │      6 │          6 │              6 │" in out
    assert "│ all   │      9 │          7 │              7 │" in out
    assert "image sizes: 128x64 (9)" in out
    assert "junk_identity: 1  (e.g. 0000_c1s1_000151_01.jpg: junk/distractor identity 0000)" in out
    assert "missing_keypoints: 3" in out  # 0002_c2s1…, 0007_…, the query image
    assert "unreadable_image: 1  (e.g. 0001_c2s1_000401_00.jpg: OSError: image file is" in out


def test_index_json(tmp_path: Path) -> None:
    result = runner.invoke(app, ["data", "index", str(make_market(tmp_path)), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["format"] == "market"
    assert (report["images"], report["identities"], report["with_keypoints"]) == (9, 7, 7)
    assert report["splits"]["train"] == {"images": 3, "identities": 2, "with_keypoints": 1}
    assert "query" not in report["splits"]  # its only image is corrupt
    assert report["problems"] == {
        "junk_identity": 1,
        "missing_keypoints": 3,
        "unreadable_image": 1,
    }
    assert report["image_sizes"] == {"128x64": 9}
    example = report["problem_examples"]["unreadable_image"][0]
    assert example["path"] == str(tmp_path / "query" / "0001_c2s1_000401_00.jpg")


def test_index_photo_folder_with_explicit_format(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    Image.new("RGB", (30, 20)).save(tmp_path / "a" / "x.png")
    Image.new("RGB", (30, 20)).save(tmp_path / "y.jpg")
    result = runner.invoke(app, ["data", "index", str(tmp_path), "--format", "folder", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["splits"] == {"all": {"images": 2, "identities": 2, "with_keypoints": 0}}
    assert report["problems"] == {} and report["image_sizes"] == {"20x30": 2}


def test_index_errors_exit_2(tmp_path: Path) -> None:
    missing = runner.invoke(app, ["data", "index", str(tmp_path / "nope")])
    assert missing.exit_code == 2
    assert missing.output.strip() == f"error: {tmp_path / 'nope'}: no such file or directory"
    empty = runner.invoke(app, ["data", "index", str(tmp_path)])
    assert empty.exit_code == 2
    assert "not a Market-1501 or DeepFashion layout, and no images" in empty.output
    wrong = runner.invoke(app, ["data", "index", str(tmp_path), "--format", "coco"])
    assert wrong.exit_code == 2
    assert "--format must be one of auto, market, deepfashion, folder" in wrong.output
    Image.new("RGB", (8, 8)).save(tmp_path / "x.jpg")
    not_market = runner.invoke(app, ["data", "index", str(tmp_path), "--format", "market"])
    assert not_market.exit_code == 2
    assert "not a market dataset (none of bounding_box_train/" in not_market.output


def test_poses_export(tmp_path: Path) -> None:
    root = make_market(tmp_path / "market")
    out = tmp_path / "poses.json"
    args = ["data", "poses", "--from", str(root), "--out", str(out), "--split", "test"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == (
        f"wrote 6 poses (128x64) from the market dataset {root} (split 'test') to {out}"
    )
    poses = load_pose_file(out)
    assert poses.frame == (128, 64)
    assert poses.ids == [f"bounding_box_test/{n}" for n in TEST_NAMES]
    assert poses.poses[0][1][4].tolist() == [65, 18, 1] and poses.poses[0][1][11].tolist() == [
        0,
        0,
        0,
    ]

    limited = [*args, "--limit", "3", "--seed", "5"]
    assert (
        runner.invoke(
            app, [*limited[:4], "--out", str(tmp_path / "a.json"), *limited[6:]]
        ).exit_code
        == 0
    )
    assert (
        runner.invoke(
            app, [*limited[:4], "--out", str(tmp_path / "b.json"), *limited[6:]]
        ).exit_code
        == 0
    )
    first = (tmp_path / "a.json").read_bytes()
    assert first == (tmp_path / "b.json").read_bytes()
    picked = load_pose_file(tmp_path / "a.json").ids
    assert len(picked) == 3 and picked == sorted(picked)

    everything = runner.invoke(app, ["data", "poses", "--from", str(root), "-o", str(out)])
    assert everything.exit_code == 0 and "wrote 7 poses (128x64)" in everything.stdout

    scaled = runner.invoke(app, [*args, "--height", "256", "--width", "128"])
    assert scaled.exit_code == 0 and "wrote 6 poses (256x128)" in scaled.stdout
    assert load_pose_file(out).poses[0][1][4].tolist() == [130, 36, 1]


def test_poses_errors_exit_2(tmp_path: Path) -> None:
    root = make_market(tmp_path / "market")
    out = tmp_path / "poses.json"
    base = ["data", "poses", "--from", str(root), "--out", str(out)]
    bad_split = runner.invoke(app, [*base, "--split", "val"])
    assert bad_split.exit_code == 2
    assert f"error: no split 'val' in {root}; it has: query, test, train" in bad_split.output
    half_frame = runner.invoke(app, [*base, "--height", "10"])
    assert half_frame.exit_code == 2 and "both --height and --width" in half_frame.output
    assert runner.invoke(app, [*base, "--limit", "0"]).exit_code == 2
    no_kp = tmp_path / "photos"
    no_kp.mkdir()
    Image.new("RGB", (8, 8)).save(no_kp / "p.jpg")
    nothing = runner.invoke(app, ["data", "poses", "--from", str(no_kp), "--out", str(out)])
    assert nothing.exit_code == 2 and "no images with keypoints to export" in nothing.output
    assert not out.exists()
    unwritable = runner.invoke(
        app, ["data", "poses", "--from", str(root), "--out", str(tmp_path / "no" / "p.json")]
    )
    assert unwritable.exit_code == 2 and "cannot write" in unwritable.output
