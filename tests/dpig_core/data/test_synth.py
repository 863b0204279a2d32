"""Synthetic Market-1501 people: format, determinism, ground truth and factor independence."""

from __future__ import annotations

import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from cli.data_synth import parse_size, synth_command
from dpig_core.data.synth import (
    SPLIT_DIRS,
    Background,
    FactorRecord,
    Identity,
    SynthSummary,
    read_factors,
    render_background,
    render_person,
    render_person_mask,
    rerender,
    sample_background,
    sample_identity,
    sample_pose,
    write_market_dataset,
)
from dpig_core.pose import limb_mask, read_keypoints_csv

MARKET_NAME = re.compile(r"^(\d{4})_c([1-6])s([1-6])_(\d{6})_(\d{2})\.jpg$")
NOSE, R_EYE, L_EYE, R_EAR, L_EAR = 0, 14, 15, 16, 17
SIZES = [(128, 64), (64, 32)]
# limb_mask radius of the fg/bg split: 7 at 128x64 (spec §2.6), halved (floored) for 64x32.
MASK_RADIUS = {128: 7, 64: 3}


def _write(root: Path, height: int = 128, width: int = 64, seed: int = 0) -> SynthSummary:
    return write_market_dataset(
        root, identities=6, per_identity=4, height=height, width=width, seed=seed, progress=False
    )


@pytest.fixture(scope="module", params=SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def dataset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    height, width = request.param
    root = tmp_path_factory.mktemp(f"synth{height}")
    return root, _write(root, height, width), read_factors(root)


def _image_names(root: Path) -> dict[str, list[str]]:
    return {split: sorted(p.name for p in (root / d).iterdir()) for split, d in SPLIT_DIRS.items()}


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    _write(tmp_path / "a")
    _write(tmp_path / "b")
    _write(tmp_path / "c", seed=1)
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 24 + 6
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    factors = (tmp_path / "a" / "factors.jsonl").read_bytes()
    assert factors != (tmp_path / "c" / "factors.jsonl").read_bytes()


def test_render_is_deterministic() -> None:
    rng = np.random.default_rng(3)
    identity, background = sample_identity(rng), sample_background(rng)
    pose = sample_pose(rng, 128, 64)
    first = render_person(identity, pose, background, 128, 64, seed=5, camera=2)
    again = render_person(identity, pose, background, 128, 64, seed=5, camera=2)
    assert first.shape == (128, 64, 3) and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, render_person(identity, pose, background, 128, 64, seed=6))


def test_market_names_and_identity_split(dataset) -> None:
    root, summary, records = dataset
    names = _image_names(root)
    assert len(names["train"]) == summary.train_images == 12
    assert len(names["test"]) == summary.test_images == 9
    assert len(names["query"]) == summary.query_images == 3
    all_names = [n for split in names.values() for n in split]
    assert len(set(all_names)) == len(all_names) == len(records)
    pids: dict[str, set[int]] = defaultdict(set)
    cams: dict[tuple[str, int], set[int]] = defaultdict(set)
    for split, split_names in names.items():
        for name in split_names:
            match = MARKET_NAME.match(name)
            assert match is not None, name
            pid, cam = int(match.group(1)), int(match.group(2))
            assert pid >= 1
            assert records[name].pid == pid and records[name].camera == cam
            assert records[name].split == split
            pids[split].add(pid)
            cams[(split, pid)].add(cam)
    assert not pids["train"] & (pids["test"] | pids["query"])
    assert pids["query"] == pids["test"]
    assert len(pids["train"]) == summary.train_identities == 3
    for pid in pids["query"]:  # the query camera is never a gallery camera of the same person
        assert not cams[("query", pid)] & cams[("test", pid)]
    manifest = json.loads((root / "synth.json").read_text())
    assert manifest["counts"]["query_images"] == 3 and manifest["arguments"]["identities"] == 6


def test_annotations_parse_and_lie_inside_the_frame(dataset) -> None:
    root, summary, records = dataset
    names = _image_names(root)
    train = read_keypoints_csv(root / "market-annotation-train.csv")
    test = read_keypoints_csv(root / "market-annotation-test.csv")
    assert sorted(train) == names["train"]
    assert sorted(test) == sorted(names["test"] + names["query"])
    for name, rcv in {**train, **test}.items():
        visible = rcv[:, 2] > 0
        assert visible[[1, 2, 5, 8, 11]].all(), name  # neck, shoulders and hips always present
        assert (rcv[visible, 0] >= 0).all() and (rcv[visible, 0] < summary.height).all()
        assert (rcv[visible, 1] >= 0).all() and (rcv[visible, 1] < summary.width).all()
        assert (rcv[~visible] == 0).all()
        stored = records[name].pose
        assert np.array_equal(rcv[:, :2], np.floor(stored[:, :2]))
        assert np.array_equal(rcv[:, 2], stored[:, 2])


def test_pairs_are_different_images_of_one_identity(dataset) -> None:
    root, _, records = dataset
    for split, expected in (("train", 3 * 4 * 3), ("test", 3 * 4 * 3)):
        lines = (root / f"market-pairs-{split}.csv").read_text().splitlines()
        assert lines[0] == "from,to"
        pairs = [line.split(",") for line in lines[1:]]
        assert len(pairs) == len(set(map(tuple, pairs))) == expected
        for a, b in pairs:
            assert a != b and records[a].pid == records[b].pid
            assert (records[a].split == "train") == (split == "train")


def test_factors_round_trip_through_json(dataset) -> None:
    _, _, records = dataset
    for record in list(records.values())[:5]:
        data = json.loads(json.dumps(record.to_dict()))
        assert set(data) >= {"name", "split", "identity", "background", "pose", "camera", "seed"}
        again = FactorRecord.from_dict(data)
        assert again == record and np.array_equal(again.pose, record.pose)
        assert Identity.from_dict(record.identity.to_dict()) == record.identity
        assert Background.from_dict(record.background.to_dict()) == record.background


def test_rerender_reproduces_the_stored_jpeg(dataset) -> None:
    root, _, records = dataset
    for record in records.values():
        stored = np.asarray(Image.open(root / record.path).convert("RGB"), dtype=np.float32)
        assert stored.shape == (record.height, record.width, 3)
        assert np.abs(stored - rerender(record)).mean() < 3.0, record.name


def test_changing_the_background_keeps_the_person(dataset) -> None:
    _, summary, records = dataset
    height, width = summary.height, summary.width
    items = list(records.values())
    changed_inside = []
    for record in items:
        other = next(r for r in items if r.camera != record.camera)
        swapped = rerender(record, background=other.background).astype(int)
        original = rerender(record).astype(int)
        changed = np.abs(swapped - original).max(axis=-1) > 2
        inside = limb_mask(record.pose, height, width, MASK_RADIUS[height]).astype(bool)
        person = render_person_mask(record.identity, record.pose, height, width) == 255
        assert not changed[person].any(), record.name
        assert changed[~inside].mean() > 0.6, record.name
        # The mask is a generous band around the skeleton: thin arms leave background inside it.
        assert changed[inside].mean() < 0.55, record.name
        changed_inside.append(changed[inside].mean())
    assert np.mean(changed_inside) < 0.4


def test_person_is_drawn_where_the_keypoints_are(dataset) -> None:
    _, summary, records = dataset
    height, width = summary.height, summary.width
    for record in records.values():
        person = render_person_mask(record.identity, record.pose, height, width) >= 128
        core = limb_mask(record.pose, height, width, MASK_RADIUS[height] // 2 + 1).astype(bool)
        wide = limb_mask(record.pose, height, width, MASK_RADIUS[height]).astype(bool)
        assert person[core].mean() > 0.65, record.name
        assert wide[person].mean() > 0.65, record.name  # hair, bags and cropped shins stick out
        ys = np.nonzero(person.any(axis=1))[0]
        assert ys.max() - ys.min() + 1 >= 0.7 * height, record.name


def test_background_is_untouched_where_no_person_is_drawn() -> None:
    rng = np.random.default_rng(11)
    for height, width in SIZES:
        identity, background = sample_identity(rng), sample_background(rng)
        pose = sample_pose(rng, height, width)
        person = render_person(identity, pose, background, height, width, seed=9, camera=4)
        scene = render_background(background, height, width, 9, camera=4)
        empty = render_person_mask(identity, pose, height, width) == 0
        shadowless = empty.copy()
        feet = pose[[10, 13]][pose[[10, 13], 2] > 0, 0]
        if len(feet):  # the cast shadow darkens the ground below the ankles
            shadowless[int(feet.min()) :] = False
        assert np.array_equal(person[shadowless], scene[shadowless])
        assert not np.array_equal(person[~empty], scene[~empty])


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_sampled_poses(height: int, width: int) -> None:
    rng = np.random.default_rng(7)
    poses = [sample_pose(rng, height, width) for _ in range(400)]
    cropped = 0
    for rcv in poses:
        assert rcv.shape == (18, 3) and rcv.dtype == np.float32
        visible = rcv[:, 2] > 0
        assert set(np.unique(rcv[:, 2])) <= {0.0, 1.0}
        assert (rcv[~visible] == 0).all()
        assert (rcv[visible, 0] >= 0).all() and (rcv[visible, 0] < height).all()
        assert (rcv[visible, 1] >= 0).all() and (rcv[visible, 1] < width).all()
        assert np.array_equal(rcv[:, :2] * 4, np.round(rcv[:, :2] * 4))  # exact in JSON
        cropped += not visible[10] and not visible[13]
        if visible[10] or visible[13]:
            extent = rcv[visible, 0].max() - rcv[visible, 0].min()
            assert 0.5 * height < extent < 0.95 * height
    assert 4 <= cropped <= 40  # about 5% of the feet are cut off, as in Market crops


def test_viewpoints_hide_the_right_face_points() -> None:
    rng = np.random.default_rng(2)
    for _ in range(30):
        back = sample_pose(rng, 128, 64, view="back")
        assert back[[NOSE, R_EYE, L_EYE], 2].sum() == 0
        assert back[[R_EAR, L_EAR], 2].all()
        assert back[5, 1] < back[2, 1]  # the left shoulder is on the image left from behind
        front = sample_pose(rng, 128, 64, view="front")
        assert front[[NOSE, R_EYE, L_EYE, R_EAR, L_EAR], 2].all()
        assert front[2, 1] < front[5, 1]
        right = sample_pose(rng, 128, 64, view="right")  # the right side faces the camera
        assert right[[NOSE, R_EYE, R_EAR], 2].all() and right[[L_EYE, L_EAR], 2].sum() == 0
        left = sample_pose(rng, 128, 64, view="left")
        assert left[[NOSE, L_EYE, L_EAR], 2].all() and left[[R_EYE, R_EAR], 2].sum() == 0


def test_mixed_viewpoints_are_sampled() -> None:
    rng = np.random.default_rng(4)
    poses = [sample_pose(rng, 128, 64) for _ in range(300)]
    back = sum(p[NOSE, 2] == 0 for p in poses)
    side = sum((p[R_EYE, 2] > 0) != (p[L_EYE, 2] > 0) for p in poses)
    assert 0.15 < back / len(poses) < 0.5
    assert 0.15 < side / len(poses) < 0.5


def test_identities_are_diverse() -> None:
    rng = np.random.default_rng(0)
    people = [sample_identity(rng) for _ in range(200)]
    assert {p.hair_style for p in people} == {"short", "long", "bald", "cap"}
    assert {p.top_pattern for p in people} == {
        "solid",
        "hstripes",
        "vstripes",
        "two_tone",
        "checks",
    }
    assert {p.bottom_type for p in people} == {"trousers", "shorts", "skirt"}
    assert any(p.bag is not None for p in people) and any(p.bag is None for p in people)
    assert min(math.dist(p.top_color, p.top_secondary) for p in people) > 40
    tops = np.array([p.top_color for p in people], dtype=float)
    assert tops.std(axis=0).min() > 40


def test_validation_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="query_per_identity"):
        write_market_dataset(tmp_path, identities=2, per_identity=2, query_per_identity=2)
    with pytest.raises(ValueError, match="test_fraction"):
        write_market_dataset(tmp_path, identities=2, per_identity=2, test_fraction=1.5)
    write_market_dataset(tmp_path, identities=1, per_identity=2, progress=False)
    with pytest.raises(FileExistsError, match="empty folder"):
        write_market_dataset(tmp_path, identities=1, per_identity=2, progress=False)


def test_parse_size() -> None:
    assert parse_size("128x64") == (128, 64)
    assert parse_size("64X32") == (64, 32)
    for bad in ("128", "128x", "axb", "8x4", "128*64"):
        with pytest.raises(typer.BadParameter):
            parse_size(bad)


def test_synth_command(tmp_path: Path) -> None:
    app = typer.Typer()
    app.command()(synth_command)
    runner = CliRunner()
    out = tmp_path / "tiny"
    args = ["--out", str(out), "--identities", "2", "--per-identity", "2", "--size", "64x32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Wrote" in result.output and (out / "factors.jsonl").exists()
    bad = runner.invoke(app, ["--out", str(tmp_path / "other"), "--size", "big"])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.output
    again = runner.invoke(app, args)  # refuses to mix a second dataset into the first
    assert again.exit_code == 2 and "empty folder" in again.output
