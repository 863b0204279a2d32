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


# ------------------------------------------------------------------------------------------------
# recipe options (docs/training.md)

RECIPE = {
    "ema_decay": 0.9,
    "lr_schedule": "cosine",
    "cosine_from": 2,
    "cosine_to": 6,
    "warmup_steps": 1,
    "person_l1_weight": 20.0,
    "d_same_batch": True,
    "freeze_d_in_g_step": True,
    "bf16_cpu": True,
}


def test_cosine_schedule_is_constant_then_falls_to_zero() -> None:
    cfg = Stage1Config(steps=10, lr=1.0, lr_schedule="cosine", cosine_from=4, cosine_to=8)
    lrs = [cfg.lr_at(s) for s in range(10)]
    assert lrs[:5] == [1.0] * 5
    assert lrs[6] == pytest.approx(0.5)
    assert lrs[8] == lrs[9] == pytest.approx(0.0)
    assert Stage1Config().lr_at(50_000) == pytest.approx(1e-5)  # the reference halving
    with pytest.raises(ValueError, match="lr_schedule"):
        Stage1Config(lr_schedule="linear")


def test_ema_update_is_the_weighted_mean() -> None:
    from dpig_core.train.ema import EMA

    net = torch.nn.Linear(2, 1)
    start = net.weight.detach().clone()
    ema = EMA([net], decay=0.75)
    with torch.no_grad():
        net.weight.add_(4.0)
    ema.update()
    assert torch.allclose(ema.shadow[0]["weight"], start + 1.0)
    with ema.applied():
        assert torch.allclose(net.weight, start + 1.0)
    assert torch.allclose(net.weight, start + 4.0)


def test_stage1_saves_the_ema_weights(tiny_market: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(steps=3, batch_size=4, lr=1e-3, sample_every=0, ema_decay=0.5)
    model = _model()
    train_stage1(model, _dataset(tiny_market), cfg, tmp_path, device=CPU, progress=False)
    state = torch.load(tmp_path / "checkpoints" / "stage1.pt", weights_only=False)
    raw, shadow = state["model"], state["ema"]["shadow"]
    name = next(k for k, v in model.encoder.state_dict().items() if v.is_floating_point())
    assert torch.equal(model.encoder.state_dict()[name], shadow[0][name])
    assert not torch.equal(raw[f"encoder.{name}"], shadow[0][name])


def test_warmup_trains_on_l1_alone_and_skips_d(tiny_market: Path, tmp_path: Path) -> None:
    cfg = Stage1Config(steps=3, batch_size=4, lr=1e-3, sample_every=0, log_every=1,
                       warmup_steps=3, person_l1_weight=20.0)  # fmt: skip
    model = _model()
    d_before = {k: v.clone() for k, v in model.discriminator.state_dict().items()}
    e_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_stage1(model, _dataset(tiny_market), cfg, tmp_path, device=CPU, progress=False)
    for key, value in model.discriminator.state_dict().items():
        assert torch.equal(value.cpu(), d_before[key]), key
    assert any(not torch.equal(v, e_before[k]) for k, v in model.encoder.state_dict().items())
    log = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]  # G trains from step 0 during the warm-up
    assert all("d_loss" not in r and "g_adv" not in r and r["person_l1"] > 0 for r in log)


def test_stage1_resume_is_exact_with_every_recipe_option(tiny_market: Path, tmp_path: Path) -> None:
    """Held-out scoring (the learning curve) included: it must not disturb the run."""
    cfg = Stage1Config(steps=6, batch_size=4, lr=1e-3, sample_every=0, checkpoint_every=3,
                       log_every=1, eval_data=str(tiny_market), eval_every=3, eval_images=8,
                       **RECIPE)  # fmt: skip
    straight = _model()
    train_stage1(straight, _dataset(tiny_market), cfg, tmp_path / "a", device=CPU, progress=False)
    halves = _model()
    half = Stage1Config(**{**cfg.to_dict(), "steps": 3})
    train_stage1(halves, _dataset(tiny_market), half, tmp_path / "b", device=CPU, progress=False)
    resumed = _model()
    train_stage1(resumed, _dataset(tiny_market), cfg, tmp_path / "b", device=CPU, resume=True,
                 progress=False)  # fmt: skip
    _assert_same_state(straight, resumed)
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    log = [r for r in map(json.loads, lines) if r["stage"] == "stage1"]
    assert [r["lr"] for r in log] == [cfg.lr_at(s) for s in range(6)]
    assert "d_loss" not in log[0] and "d_loss" in log[1] and "g_adv" in log[2]
    heldout = [r for r in map(json.loads, lines) if r["stage"] == "stage1_heldout"]
    assert [r["step"] for r in heldout] == [3, 6]
    assert heldout[-1]["perfect_render_ssim_dpig"] > heldout[-1]["ssim_dpig"]
    assert 0 <= heldout[-1]["ground_truth_leakage_ratio"] < heldout[-1]["leakage_ratio"]
