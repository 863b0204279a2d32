from __future__ import annotations

import json
import logging
import statistics
from pathlib import Path

import pytest
import torch

from dpig_core.config import PRESETS
from dpig_core.data.dataset import PersonDataset
from dpig_core.data.readers import read_market
from dpig_core.models import DPIG
from dpig_core.train.config import MappingConfig, PoseAEConfig, Stage1Config
from dpig_core.train.loop import BatchStream
from dpig_core.train.mappings import embedding_bank, train_mappings
from dpig_core.train.pose_ae import train_pose_ae
from dpig_core.train.stage1 import train_stage1

CPU = torch.device("cpu")
CFG = PRESETS["tiny"]


def _model() -> DPIG:
    torch.manual_seed(0)
    return DPIG(CFG)


def _dataset(root: Path) -> PersonDataset:
    return PersonDataset(read_market(root).split("train"), CFG)


def _assert_same_state(a: DPIG, b: DPIG) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_batch_stream_resumes_mid_epoch() -> None:
    whole = BatchStream(10, 4, seed=1)
    first = [whole.next_indices() for _ in range(5)]
    part = BatchStream(10, 4, seed=1)
    got = [part.next_indices() for _ in range(2)]
    resumed = BatchStream(10, 4, seed=1)
    resumed.load_state_dict(part.state_dict())
    got += [resumed.next_indices() for _ in range(3)]
    assert got == first
    # every epoch is a permutation of all items
    assert sorted(sum(first, [])[:10]) == list(range(10))


def test_stage1_resume_equals_uninterrupted(tiny_market: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(steps=4, batch_size=4, lr=1e-3, sample_every=0, checkpoint_every=2)
    straight = _model()
    train_stage1(straight, _dataset(tiny_market), cfg, tmp_path / "a", device=CPU, progress=False)

    halves = _model()
    half = Stage1Config(**{**cfg.to_dict(), "steps": 2})
    train_stage1(halves, _dataset(tiny_market), half, tmp_path / "b", device=CPU, progress=False)
    resumed = _model()  # a new process would start from a fresh model and the checkpoint
    train_stage1(resumed, _dataset(tiny_market), cfg, tmp_path / "b", device=CPU, resume=True,
                 progress=False)  # fmt: skip
    _assert_same_state(straight, resumed)
    log = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [2, 4]


def test_stage1_reduces_reconstruction_error(tiny_market: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(steps=40, batch_size=8, lr=1e-3, log_every=1, sample_every=40)
    train_stage1(_model(), _dataset(tiny_market), cfg, tmp_path, device=CPU, progress=False)
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    l1 = [r["l1"] for r in log if "l1" in r]
    assert statistics.median(l1[-8:]) < 0.75 * l1[0]
    assert (tmp_path / "samples" / "stage1_0000040.png").is_file()
    assert (tmp_path / "checkpoints" / "stage1.pt").is_file()


def test_pose_ae_resume_equals_uninterrupted(tiny_market: Path, tmp_path: Path) -> None:
    ds = _dataset(tiny_market)
    poses = torch.stack([torch.from_numpy(ds.pose_of(i)) for i in range(len(ds))])  # type: ignore[arg-type]
    cfg = PoseAEConfig(steps=6, batch_size=4, lr=1e-3, checkpoint_every=3)
    straight = _model()
    train_pose_ae(straight, poses, cfg, tmp_path / "a", device=CPU, progress=False)
    halves = _model()
    train_pose_ae(halves, poses, PoseAEConfig(**{**cfg.to_dict(), "steps": 3}), tmp_path / "b",
                  device=CPU, progress=False)  # fmt: skip
    resumed = _model()
    train_pose_ae(resumed, poses, cfg, tmp_path / "b", device=CPU, resume=True, progress=False)
    _assert_same_state(straight, resumed)


def test_mappings_resume_equals_uninterrupted(tiny_market: Path, tmp_path: Path) -> None:
    bank = embedding_bank(_model(), _dataset(tiny_market), CPU)
    assert set(bank) == {"fg", "bg", "pose"}
    assert bank["fg"].shape == (len(_dataset(tiny_market)), CFG.fg_dim)
    cfg = MappingConfig(steps=4, batch_size=4, checkpoint_every=2)

    torch.manual_seed(5)
    straight = _model()
    torch.manual_seed(5)
    train_mappings(straight, bank, cfg, tmp_path / "a", device=CPU, progress=False)

    halves = _model()
    torch.manual_seed(5)
    train_mappings(halves, bank, MappingConfig(**{**cfg.to_dict(), "steps": 2}), tmp_path / "b",
                   device=CPU, progress=False)  # fmt: skip
    resumed = _model()
    torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process has
    train_mappings(resumed, bank, cfg, tmp_path / "b", device=CPU, resume=True, progress=False)
    _assert_same_state(straight, resumed)
    for critic in resumed.critics.values():  # weight clipping held
        assert all(p.abs().max() <= cfg.clip for p in critic.parameters())


def test_corrupt_images_are_skipped_and_counted(
    tiny_market: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    records = read_market(tiny_market).split("train")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    bad = type(records[0])(tmp_path / "bad.jpg", "9999", "train", 1, records[0].rcv)
    no_pose = type(records[0])(records[1].path, "9998", "train", 1, None)
    with caplog.at_level(logging.WARNING):
        ds = PersonDataset([*records, bad, no_pose], CFG)
    assert ds.skipped.no_keypoints == 1
    assert "1 without keypoints" in caplog.text
    cfg = Stage1Config(steps=8, batch_size=4, lr=1e-4, sample_every=0, log_every=8)
    last = train_stage1(_model(), ds, cfg, tmp_path / "run", device=CPU, progress=False)
    assert last["skipped_items"] >= 1  # the bad image was read, dropped, and counted
    assert "skipping" in caplog.text and "bad.jpg" in caplog.text


def test_mostly_corrupt_dataset_stops_training(tiny_market: Path, tmp_path: Path) -> None:
    good = read_market(tiny_market).split("train")[0]
    records = []
    for i in range(40):
        path = tmp_path / f"bad{i}.jpg"
        path.write_bytes(b"garbage")
        records.append(type(good)(path, str(i), "train", 1, good.rcv))
    ds = PersonDataset([*records, good], CFG)
    cfg = Stage1Config(steps=20, batch_size=8, sample_every=0)
    with pytest.raises(RuntimeError, match="could not be decoded"):
        train_stage1(_model(), ds, cfg, tmp_path / "run", device=CPU, progress=False)
